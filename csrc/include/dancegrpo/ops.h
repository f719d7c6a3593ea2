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
// The Python side turns schedule values into a table of (coef_x, coef_v, std, log std) rows,
// once per sampler (one row per step), and each call passes the row of every sample; the
// kernels then make a single pass over the latents and write the log-probs themselves, so a
// call is one kernel and nothing else. Per-sample sums of squared deviations (next - mean)^2 are
// accumulated over fixed chunks, so results do not depend on the thread count and the
// rollout and training modes produce bit-identical sums for the same action.
#pragma once

#include <cstdint>

namespace dancegrpo {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Elements per reduction chunk of one sample. Fixed (not derived from the thread count) so
// that the summation order, and hence every bit of the result, is reproducible.
constexpr int64_t kSdeChunk = 8192;

// Columns of a step-coefficient table row, all double: coef_x, coef_v, std (each the value
// in the compute type, widened exactly) and log(std) (computed in double). A sampler builds
// its table once, one row per step; a call names each sample's row.
constexpr int64_t kSdeCoefs = 4;

// Inputs shared by the three SDE-step entry points. Pointers are host pointers for the CPU
// functions and device pointers for the CUDA ones; all buffers are contiguous.
struct SdeStepProblem {
  int64_t batch = 0;             // B
  int64_t numel = 0;             // elements per sample (product of the non-batch dims)
  DType latent_dtype = DType::kFloat32;  // sample, noise / prev_sample, next_sample
  DType output_dtype = DType::kFloat32;  // model_output: the latent dtype, or bf16/fp16 with fp32 latents
  const void* model_output = nullptr;    // (B, numel)
  const void* sample = nullptr;          // (B, numel)
  const double* coefs = nullptr;         // (rows, kSdeCoefs) step-coefficient table
  int64_t rows = 0;
  // (B,) row of each sample, or null: row b when rows == B, row 0 when rows == 1.
  const int64_t* index = nullptr;
};

// The table row of sample b (callers check 0 <= row < rows).
inline int64_t sde_row(const SdeStepProblem& p, int64_t b) {
  return p.index != nullptr ? p.index[b] : (p.rows == 1 ? 0 : b);
}

// log_prob_b = -(sumsq_b / numel) / (2 std_b^2) - log(std_b) - log(2 pi) / 2, in double, in
// this order (the order torch evaluated it in before the finalisation moved into the kernels).
constexpr double kHalfLogTwoPi = 0.91893853320467274178;  // 0.5 * log(2 pi)

// Number of reduction chunks per sample (partial sums the CUDA kernels write).
inline int64_t sde_num_chunks(int64_t numel) { return numel == 0 ? 1 : (numel + kSdeChunk - 1) / kSdeChunk; }

// ---------------------------------------------------------------------------------- CPU
// log_prob: (B,) in the compute type (float, or double for float64 latents).

// Rollout: next = round_to_latent_dtype(mean + std * noise) and the mean log-density of the
// stored (rounded) action, as the torch reference scores it.
void sde_step_sample_cpu(const SdeStepProblem& p, const void* noise, void* next, void* log_prob);

// Training: the mean log-density of the recorded action prev.
void sde_step_log_prob_cpu(const SdeStepProblem& p, const void* prev, void* log_prob);

// Gradient of sum_b grad_log_prob[b] * log_prob[b] w.r.t. the model output:
// grad_v = scale_b * (prev - mean) with scale_b = grad_log_prob[b] * coef_v_b / (std_b^2 numel)
// (in double, then rounded to the compute type), written in the model output's dtype.
// grad_log_prob (B,) is in the compute type.
void sde_step_backward_cpu(const SdeStepProblem& p, const void* prev, const void* grad_log_prob, void* grad_v);

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
// Same contracts on device pointers; `stream` is a cudaStream_t. Each call is one kernel
// launch (after a memset of its counters): a grid of (chunk, sample) blocks, each writing the
// partial sum of its chunk; the last block of a sample to finish (counted with an atomic)
// adds that sample's partials in a fixed order and writes its log-prob, so the result is
// deterministic and the grid fills the GPU whatever the batch. Nothing synchronises with the
// host and no buffer depends on host values, so the calls can be captured in a CUDA graph.

// workspace: sde_workspace_bytes(batch, numel) bytes, 8-byte aligned.
void sde_step_sample_cuda(const SdeStepProblem& p, const void* noise, void* next, void* log_prob, void* workspace,
                          void* stream);
void sde_step_log_prob_cuda(const SdeStepProblem& p, const void* prev, void* log_prob, void* workspace,
                            void* stream);
void sde_step_backward_cuda(const SdeStepProblem& p, const void* prev, const void* grad_log_prob, void* grad_v,
                            void* stream);
// Elements per CUDA block of the SDE kernels (4 per thread): small, so that even one video
// latent (1x16x14x60x60: 788 blocks) or a batch of images (8x16x90x90: 1016 blocks) gives
// every SM of an H100/H200 several blocks, while the final per-sample sum stays short.
constexpr int64_t kCudaSdeChunk = 1024;
inline int64_t sde_cuda_chunks(int64_t numel) { return numel == 0 ? 1 : (numel + kCudaSdeChunk - 1) / kCudaSdeChunk; }
// Workspace of the SDE kernels: one double per (sample, CUDA chunk), then one counter per sample.
inline int64_t sde_workspace_bytes(int64_t batch, int64_t numel) {
  return batch * sde_cuda_chunks(numel) * 8 + batch * 4;
}

// One launch (after a memset of one counter): blocks of kClippedLossBlock elements write 5
// partials each; the last block to finish combines them in a fixed order and writes, in
// the compute dtype, loss_out (0-d: the mean loss) and stats_out (4: ratio mean, min, max,
// clip fraction). workspace: clipped_loss_workspace_bytes(n) bytes, 8-byte aligned.
void clipped_loss_cuda(int64_t n, DType dtype, const void* new_logp, const void* old_logp, const void* adv,
                       double clip_range, bool has_adv_clip, double adv_clip_max, void* ratio_out,
                       void* grad_out, void* loss_out, void* stats_out, void* workspace, void* stream);
constexpr int64_t kClippedLossBlock = 1024;
inline int64_t clipped_loss_blocks(int64_t n) { return n == 0 ? 1 : (n + kClippedLossBlock - 1) / kClippedLossBlock; }
inline int64_t clipped_loss_workspace_bytes(int64_t n) { return 5 * clipped_loss_blocks(n) * 8 + 8; }

}  // namespace dancegrpo
