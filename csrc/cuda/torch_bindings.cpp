// Torch extension `dancegrpo._ops_cuda`: tensor checks and conversions around the CUDA kernels,
// launched on torch's current stream of the tensors' device. Nothing here synchronises.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "dancegrpo/ops.h"
#include "dancegrpo/torch_binding_utils.h"

#ifndef DANCEGRPO_SOURCE_HASH
#define DANCEGRPO_SOURCE_HASH 0ULL
#endif

namespace {

using namespace dancegrpo::binding;
constexpr auto kCUDA = at::DeviceType::CUDA;

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

at::Tensor workspace_for(const SdeInputs& in) {
  return at::empty({dancegrpo::sde_workspace_size(in.problem.batch, in.problem.numel)},
                   in.sample.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor> sde_step_sample(const at::Tensor& model_output, const at::Tensor& sample,
                                                   const at::Tensor& noise, const at::Tensor& coef_x,
                                                   const at::Tensor& coef_v, const at::Tensor& std) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto in = prepare_sde(model_output, sample, noise, "noise", coef_x, coef_v, std, kCUDA);
  auto next = at::empty_like(in.sample);
  auto sumsq = at::empty({in.problem.batch}, sample.options().dtype(at::kDouble));
  auto workspace = workspace_for(in);
  dancegrpo::sde_step_sample_cuda(in.problem, in.std.data_ptr(), in.action.data_ptr(), next.data_ptr(),
                                  sumsq.data_ptr<double>(), workspace.data_ptr<double>(), current_stream());
  return {next, log_prob_from_sumsq(sumsq, in.std, in.problem.numel)};
}

at::Tensor sde_step_log_prob(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& prev_sample,
                             const at::Tensor& coef_x, const at::Tensor& coef_v, const at::Tensor& std) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coef_x, coef_v, std, kCUDA);
  auto sumsq = at::empty({in.problem.batch}, sample.options().dtype(at::kDouble));
  auto workspace = workspace_for(in);
  dancegrpo::sde_step_sumsq_cuda(in.problem, in.action.data_ptr(), sumsq.data_ptr<double>(),
                                 workspace.data_ptr<double>(), current_stream());
  return log_prob_from_sumsq(sumsq, in.std, in.problem.numel);
}

at::Tensor sde_step_backward(const at::Tensor& grad_logp, const at::Tensor& model_output, const at::Tensor& sample,
                             const at::Tensor& prev_sample, const at::Tensor& coef_x, const at::Tensor& coef_v,
                             const at::Tensor& std) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coef_x, coef_v, std, kCUDA);
  const auto scale = grad_scale(grad_logp, in);
  auto grad = at::empty_like(in.model_output);
  dancegrpo::sde_step_backward_cuda(in.problem, in.action.data_ptr(), scale.data_ptr(), grad.data_ptr(),
                                    current_stream());
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clipped_loss(const at::Tensor& new_logp,
                                                                        const at::Tensor& old_logp,
                                                                        const at::Tensor& advantages, double clip_range,
                                                                        std::optional<double> adv_clip_max) {
  const c10::cuda::CUDAGuard guard(new_logp.device());
  auto in = prepare_loss(new_logp, old_logp, advantages, clip_range, kCUDA);
  auto ratio = at::empty({in.n}, in.new_logp.options()), grad = at::empty({in.n}, in.new_logp.options());
  auto stats64 = at::empty({5}, in.new_logp.options().dtype(at::kDouble));
  auto workspace = at::empty({dancegrpo::clipped_loss_workspace_size(in.n)}, stats64.options());
  dancegrpo::clipped_loss_cuda(in.n, in.dtype == at::kDouble ? dancegrpo::DType::kFloat64 : dancegrpo::DType::kFloat32,
                               in.new_logp.data_ptr(), in.old_logp.data_ptr(), in.adv.data_ptr(), clip_range,
                               adv_clip_max.has_value(), adv_clip_max.value_or(0.0), ratio.data_ptr(), grad.data_ptr(),
                               stats64.data_ptr<double>(), workspace.data_ptr<double>(), current_stream());
  // stats64 = {loss_sum, ratio_sum, ratio_min, ratio_max, clipped}: means on the device, no sync.
  const double n = static_cast<double>(in.n);
  auto scale = at::tensor({1.0 / n, 1.0 / n, 1.0, 1.0, 1.0 / n}, stats64.options());
  auto scaled = (stats64 * scale).to(in.dtype);
  auto loss = scaled[0].clone();
  auto stats = at::stack({scaled[1], scaled[2], scaled[3], scaled[4]});
  return {loss, ratio, grad, stats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo fused ops, CUDA kernels";
  m.def("sde_step_sample", &sde_step_sample, "rollout SDE step: (next_sample, log_prob)");
  m.def("sde_step_log_prob", &sde_step_log_prob, "training SDE step: log_prob of prev_sample");
  m.def("sde_step_backward", &sde_step_backward, "gradient of the log-prob w.r.t. model_output");
  m.def("clipped_loss", &clipped_loss, "clipped-ratio loss: (loss, ratio, grad_new, stats)");
  m.attr("source_hash") = pybind11::int_(static_cast<uint64_t>(DANCEGRPO_SOURCE_HASH));
}
