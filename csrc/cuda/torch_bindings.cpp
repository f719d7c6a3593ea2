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
  return at::empty({dancegrpo::sde_workspace_bytes(in.problem.batch, in.problem.numel)},
                   in.sample.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> sde_step_sample(const at::Tensor& model_output, const at::Tensor& sample,
                                                   const at::Tensor& noise, const at::Tensor& coefs,
                                                   const std::optional<at::Tensor>& index) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto in = prepare_sde(model_output, sample, noise, "noise", coefs, index, kCUDA);
  auto next = at::empty_like(in.sample);
  auto log_prob = at::empty({in.problem.batch}, sample.options().dtype(in.compute));
  auto workspace = workspace_for(in);
  dancegrpo::sde_step_sample_cuda(in.problem, in.action.data_ptr(), next.data_ptr(), log_prob.data_ptr(),
                                  workspace.data_ptr(), current_stream());
  return {next, log_prob};
}

at::Tensor sde_step_log_prob(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& prev_sample,
                             const at::Tensor& coefs, const std::optional<at::Tensor>& index) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coefs, index, kCUDA);
  auto log_prob = at::empty({in.problem.batch}, sample.options().dtype(in.compute));
  auto workspace = workspace_for(in);
  dancegrpo::sde_step_log_prob_cuda(in.problem, in.action.data_ptr(), log_prob.data_ptr(), workspace.data_ptr(),
                                    current_stream());
  return log_prob;
}

at::Tensor sde_step_backward(const at::Tensor& grad_logp, const at::Tensor& model_output, const at::Tensor& sample,
                             const at::Tensor& prev_sample, const at::Tensor& coefs,
                             const std::optional<at::Tensor>& index) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto in = prepare_sde(model_output, sample, prev_sample, "prev_sample", coefs, index, kCUDA);
  const auto grad_logp_c = grad_log_prob_for(grad_logp, in);
  auto grad = at::empty_like(in.model_output);
  dancegrpo::sde_step_backward_cuda(in.problem, in.action.data_ptr(), grad_logp_c.data_ptr(), grad.data_ptr(),
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
  auto loss = at::empty({}, in.new_logp.options()), stats = at::empty({4}, in.new_logp.options());
  auto workspace = at::empty({dancegrpo::clipped_loss_workspace_bytes(in.n)}, in.new_logp.options().dtype(at::kByte));
  // One launch writes every output on the device: no host round trip, nothing built from host values.
  dancegrpo::clipped_loss_cuda(in.n, in.dtype == at::kDouble ? dancegrpo::DType::kFloat64 : dancegrpo::DType::kFloat32,
                               in.new_logp.data_ptr(), in.old_logp.data_ptr(), in.adv.data_ptr(), clip_range,
                               adv_clip_max.has_value(), adv_clip_max.value_or(0.0), ratio.data_ptr(), grad.data_ptr(),
                               loss.data_ptr(), stats.data_ptr(), workspace.data_ptr(), current_stream());
  return {loss, ratio, grad, stats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo fused ops, CUDA kernels";
  DANCEGRPO_DEFINE_FUSED_OPS(m);
}
