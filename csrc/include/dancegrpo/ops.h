// Plain C++ interface of the fused DanceGRPO ops (no torch dependency).
//
// The torch bindings (csrc/cpu/torch_bindings.cpp, csrc/cuda/torch_bindings.cpp) check and
// convert tensors and call these functions; the standalone C++ test and profiling builds
// (CMakeLists.txt) call them directly on raw buffers.
//
// SDE step. Every supported sampler step (rectified-flow DanceGRPO / Flow-GRPO forms, DDIM
// with eta) has a mean that is linear in the latent x and the model output v with per-sample
// coefficients, and a per-sample std:
//     mean = coef_x[b] * x + coef_v[b] * v,      next = mean + std[b] * noise.
// The Python side turns schedule values into (coef_x, coef_v, std); the kernels then make a
// single pass over the latents. Per-sample sums of squared deviations (next - mean)^2 are
// accumulated over fixed chunks, so results do not depend on the thread count and the
// rollout and training modes produce bit-identical sums for the same action.
#pragma once

#include <cstdint>

namespace dancegrpo {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Elements per reduction chunk of one sample. Fixed (not derived from the thread count) so
// that the summation order, and hence every bit of the result, is reproducible.
constexpr int64_t kSdeChunk = 8192;

// Inputs shared by the three SDE-step entry points. Pointers are host pointers for the CPU
// functions and device pointers for the CUDA ones; all buffers are contiguous.
struct SdeStepProblem {
  int64_t batch = 0;             // B
  int64_t numel = 0;             // elements per sample (product of the non-batch dims)
  DType latent_dtype = DType::kFloat32;  // sample, noise / prev_sample, next_sample
  DType output_dtype = DType::kFloat32;  // model_output: the latent dtype, or bf16/fp16 with fp32 latents
  const void* model_output = nullptr;    // (B, numel)
  const void* sample = nullptr;          // (B, numel)
  // Per-sample coefficients (B,) in the compute type: double for float64 latents, else float.
  const void* coef_x = nullptr;
  const void* coef_v = nullptr;
};

// Number of reduction chunks per sample (partial sums the CUDA kernels write).
inline int64_t sde_num_chunks(int64_t numel) { return numel == 0 ? 1 : (numel + kSdeChunk - 1) / kSdeChunk; }

// ---------------------------------------------------------------------------------- CPU

// Rollout: next = round_to_latent_dtype(mean + std * noise); sumsq[b] = sum (next - mean)^2,
// the stored (rounded) action being scored, as the torch reference does.
void sde_step_sample_cpu(const SdeStepProblem& p, const void* std, const void* noise, void* next,
                         double* sumsq);

// Training: sumsq[b] = sum (prev - mean)^2.
void sde_step_sumsq_cpu(const SdeStepProblem& p, const void* prev, double* sumsq);

// Gradient of a per-sample scalar in the (prev - mean)^2 sums w.r.t. the model output:
// grad_v = grad_scale[b] * (prev - mean), written in the model output's dtype.
// grad_scale (B,) is in the compute type.
void sde_step_backward_cpu(const SdeStepProblem& p, const void* prev, const void* grad_scale, void* grad_v);

// Clipped-ratio loss over n elements. All vectors in one compute dtype (kFloat32 or kFloat64).
// Per element: r = exp(new - old), a = clamp(adv, +-adv_clip_max) if has_adv_clip,
// loss_i = max(-a r, -a clamp(r, lo, hi)); grad_out[i] = d mean(loss) / d new[i], with
// torch's subgradient conventions (maximum splits ties evenly, clamp passes its bounds).
struct ClippedLossStats {
  double loss_sum = 0.0;
  double ratio_sum = 0.0;
  double ratio_min = 0.0;
  double ratio_max = 0.0;
  int64_t clipped = 0;  // elements with |r - 1| > clip_range
};

void clipped_loss_cpu(int64_t n, DType dtype, const void* new_logp, const void* old_logp, const void* adv,
                      double clip_range, bool has_adv_clip, double adv_clip_max, void* ratio_out,
                      void* grad_out, ClippedLossStats* stats);

// ---------------------------------------------------------------------------------- CUDA
// Same contracts on device pointers; `stream` is a cudaStream_t. Per-sample / per-loss
// reductions run in two deterministic stages (fixed chunks, then one block per output).

// sumsq: device buffer of B doubles.
void sde_step_sample_cuda(const SdeStepProblem& p, const void* std, const void* noise, void* next,
                          double* sumsq, double* workspace, void* stream);
void sde_step_sumsq_cuda(const SdeStepProblem& p, const void* prev, double* sumsq, double* workspace,
                         void* stream);
void sde_step_backward_cuda(const SdeStepProblem& p, const void* prev, const void* grad_scale, void* grad_v,
                            void* stream);
// Elements per CUDA block of the SDE kernels (more, smaller chunks than on the CPU to fill the GPU).
constexpr int64_t kCudaSdeChunk = 2048;
// Workspace for the SDE partial sums: one double per (sample, CUDA chunk).
inline int64_t sde_workspace_size(int64_t batch, int64_t numel) {
  return batch * (numel == 0 ? 1 : (numel + kCudaSdeChunk - 1) / kCudaSdeChunk);
}

// stats_out: device buffer of 5 doubles {loss_sum, ratio_sum, ratio_min, ratio_max, clipped}.
// workspace: clipped_loss_workspace_size(n) doubles.
void clipped_loss_cuda(int64_t n, DType dtype, const void* new_logp, const void* old_logp, const void* adv,
                       double clip_range, bool has_adv_clip, double adv_clip_max, void* ratio_out,
                       void* grad_out, double* stats_out, double* workspace, void* stream);
constexpr int64_t kClippedLossBlock = 1024;
inline int64_t clipped_loss_workspace_size(int64_t n) {
  return 5 * (n == 0 ? 1 : (n + kClippedLossBlock - 1) / kClippedLossBlock);
}

}  // namespace dancegrpo
