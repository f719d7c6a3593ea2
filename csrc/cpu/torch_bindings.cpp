// Torch extension `dancegrpo._ops_cpu`: tensor checks and conversions around the CPU kernels.
// The Python package (dancegrpo/ops) registers these functions as torch.library custom ops.
#include <torch/extension.h>

#include "dancegrpo/ops.h"
#include "dancegrpo/torch_binding_utils.h"

#ifndef DANCEGRPO_SOURCE_HASH
#define DANCEGRPO_SOURCE_HASH 0ULL
#endif

namespace {

using namespace dancegrpo::binding;
constexpr auto kCPU = at::DeviceType::CPU;

std::tuple<at::Tensor, at::Tensor> sde_step_sample(const at::Tensor& model_output, const at::Tensor& sample,
                                                   const at::Tensor& noise, const at::Tensor& coef_x,
                                                   const at::Tensor& coef_v, const at::Tensor& std) {
  auto in = prepare_sde(model_output, sample, noise, "noise", coef_x, coef_v, std, kCPU);
  auto next = at::empty_like(in.sample);
  auto sumsq = at::empty({in.problem.batch}, sample.options().dtype(at::kDouble));
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_sample_cpu(in.problem, in.std.data_ptr(), in.action.data_ptr(), next.data_ptr(),
                                   sumsq.data_ptr<double>());
  }
  return {next, log_prob_from_sumsq(sumsq, in.std, in.problem.numel)};
}

at::Tensor sde_step_log_prob(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& prev_sample,
                             const at::Tensor& coef_x, const at::Tensor& coef_v, const at::Tensor& std) {
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coef_x, coef_v, std, kCPU);
  auto sumsq = at::empty({in.problem.batch}, sample.options().dtype(at::kDouble));
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_sumsq_cpu(in.problem, in.action.data_ptr(), sumsq.data_ptr<double>());
  }
  return log_prob_from_sumsq(sumsq, in.std, in.problem.numel);
}

at::Tensor sde_step_backward(const at::Tensor& grad_logp, const at::Tensor& model_output, const at::Tensor& sample,
                             const at::Tensor& prev_sample, const at::Tensor& coef_x, const at::Tensor& coef_v,
                             const at::Tensor& std) {
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coef_x, coef_v, std, kCPU);
  const auto scale = grad_scale(grad_logp, in);
  auto grad = at::empty_like(in.model_output);
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_backward_cpu(in.problem, in.action.data_ptr(), scale.data_ptr(), grad.data_ptr());
  }
  return grad;
}

// (loss, ratio, grad_new, [ratio_mean, ratio_min, ratio_max, clip_fraction]) in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clipped_loss(const at::Tensor& new_logp,
                                                                        const at::Tensor& old_logp,
                                                                        const at::Tensor& advantages, double clip_range,
                                                                        std::optional<double> adv_clip_max) {
  auto in = prepare_loss(new_logp, old_logp, advantages, clip_range, kCPU);
  auto ratio = at::empty({in.n}, in.new_logp.options()), grad = at::empty({in.n}, in.new_logp.options());
  dancegrpo::ClippedLossStats s;
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::clipped_loss_cpu(in.n, in.dtype == at::kDouble ? dancegrpo::DType::kFloat64 : dancegrpo::DType::kFloat32,
                                in.new_logp.data_ptr(), in.old_logp.data_ptr(), in.adv.data_ptr(), clip_range,
                                adv_clip_max.has_value(), adv_clip_max.value_or(0.0), ratio.data_ptr(),
                                grad.data_ptr(), &s);
  }
  const double n = static_cast<double>(in.n);
  auto loss = at::scalar_tensor(s.loss_sum / n, in.new_logp.options());
  auto stats = at::tensor({s.ratio_sum / n, s.ratio_min, s.ratio_max, static_cast<double>(s.clipped) / n},
                          in.new_logp.options().dtype(at::kDouble))
                   .to(in.dtype);
  return {loss, ratio, grad, stats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo fused ops, CPU kernels (vectorised, OpenMP)";
  m.def("sde_step_sample", &sde_step_sample, "rollout SDE step: (next_sample, log_prob)");
  m.def("sde_step_log_prob", &sde_step_log_prob, "training SDE step: log_prob of prev_sample");
  m.def("sde_step_backward", &sde_step_backward, "gradient of the log-prob w.r.t. model_output");
  m.def("clipped_loss", &clipped_loss, "clipped-ratio loss: (loss, ratio, grad_new, stats)");
  m.attr("source_hash") = pybind11::int_(static_cast<uint64_t>(DANCEGRPO_SOURCE_HASH));
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
