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
                                                   const at::Tensor& noise, const at::Tensor& coefs,
                                                   const std::optional<at::Tensor>& index) {
  auto in = prepare_sde(model_output, sample, noise, "noise", coefs, index, kCPU);
  auto next = at::empty_like(in.sample);
  auto log_prob = at::empty({in.problem.batch}, sample.options().dtype(in.compute));
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_sample_cpu(in.problem, in.action.data_ptr(), next.data_ptr(), log_prob.data_ptr());
  }
  return {next, log_prob};
}

at::Tensor sde_step_log_prob(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& prev_sample,
                             const at::Tensor& coefs, const std::optional<at::Tensor>& index) {
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coefs, index, kCPU);
  auto log_prob = at::empty({in.problem.batch}, sample.options().dtype(in.compute));
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_log_prob_cpu(in.problem, in.action.data_ptr(), log_prob.data_ptr());
  }
  return log_prob;
}

at::Tensor sde_step_backward(const at::Tensor& grad_logp, const at::Tensor& model_output, const at::Tensor& sample,
                             const at::Tensor& prev_sample, const at::Tensor& coefs,
                             const std::optional<at::Tensor>& index) {
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coefs, index, kCPU);
  const auto grad_logp_c = grad_log_prob_for(grad_logp, in);
  auto grad = at::empty_like(in.model_output);
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_backward_cpu(in.problem, in.action.data_ptr(), grad_logp_c.data_ptr(), grad.data_ptr());
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
  // The means in double, rounded once to the compute dtype, written in place (no tensor ops).
  const double n = static_cast<double>(in.n);
  const double values[5] = {s.loss_sum / n, s.ratio_sum / n, s.ratio_min, s.ratio_max,
                            static_cast<double>(s.clipped) / n};
  auto loss = at::empty({}, in.new_logp.options()), stats = at::empty({4}, in.new_logp.options());
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "clipped_loss_stats", [&] {
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(values[0]);
    for (int k = 0; k < 4; ++k) stats.data_ptr<scalar_t>()[k] = static_cast<scalar_t>(values[k + 1]);
  });
  return {loss, ratio, grad, stats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo fused ops, CPU kernels (vectorised, OpenMP)";
  DANCEGRPO_DEFINE_FUSED_OPS(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
