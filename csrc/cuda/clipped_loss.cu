// CUDA kernels of the fused clipped-ratio loss (contract in csrc/include/dancegrpo/ops.h).
// Stage 1: one block per kClippedLossBlock elements writes 5 partials; stage 2: one block
// combines them in a fixed order into {loss_sum, ratio_sum, ratio_min, ratio_max, clipped}.
#include <cmath>

#include "common.cuh"

namespace dancegrpo {
namespace {

using namespace cuda_detail;

template <typename T>
__global__ void __launch_bounds__(kThreads) clipped_loss_kernel(const T* __restrict__ new_logp,
                                                               const T* __restrict__ old_logp,
                                                               const T* __restrict__ adv, T* __restrict__ ratio_out,
                                                               T* __restrict__ grad_out, double* __restrict__ partial,
                                                               int64_t n, T lo, T hi, T clip_range, bool has_adv_clip,
                                                               T adv_clip_max, T inv_n) {
  __shared__ double shared[kThreads / 32];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kClippedLossBlock;
  const int64_t stop = start + kClippedLossBlock < n ? start + kClippedLossBlock : n;
  double loss_sum = 0, ratio_sum = 0, clipped = 0;
  double ratio_min = INFINITY, ratio_max = -INFINITY;
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
    const T r = exp(new_logp[i] - old_logp[i]);
    T a = adv[i];
    if (has_adv_clip) a = a < -adv_clip_max ? -adv_clip_max : (a > adv_clip_max ? adv_clip_max : a);
    const T unclipped = -a * r;
    const T clipped_term = -a * (r < lo ? lo : (r > hi ? hi : r));
    const T d_clipped = (r >= lo && r <= hi) ? -a : T(0);
    // torch.maximum's subgradient: the larger branch, or half of each on a tie.
    const T d_ratio = unclipped > clipped_term ? -a
                      : (unclipped < clipped_term ? d_clipped : T(0.5) * (-a + d_clipped));
    ratio_out[i] = r;
    grad_out[i] = d_ratio * r * inv_n;
    loss_sum += static_cast<double>(unclipped > clipped_term ? unclipped : clipped_term);
    ratio_sum += static_cast<double>(r);
    ratio_min = fmin(ratio_min, static_cast<double>(r));
    ratio_max = fmax(ratio_max, static_cast<double>(r));
    clipped += fabs(static_cast<double>(r - T(1))) > static_cast<double>(clip_range) ? 1.0 : 0.0;
  }
  loss_sum = block_reduce(loss_sum, Sum{}, shared);
  ratio_sum = block_reduce(ratio_sum, Sum{}, shared);
  clipped = block_reduce(clipped, Sum{}, shared);
  ratio_min = block_reduce(ratio_min, Min{}, shared);
  ratio_max = block_reduce(ratio_max, Max{}, shared);
  if (threadIdx.x == 0) {
    double* out = partial + 5 * blockIdx.x;
    out[0] = loss_sum;
    out[1] = ratio_sum;
    out[2] = ratio_min;
    out[3] = ratio_max;
    out[4] = clipped;
  }
}

__global__ void __launch_bounds__(kThreads) combine_kernel(const double* __restrict__ partial,
                                                          double* __restrict__ stats, int64_t blocks) {
  __shared__ double shared[kThreads / 32];
  double loss_sum = 0, ratio_sum = 0, clipped = 0, ratio_min = INFINITY, ratio_max = -INFINITY;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) {
    loss_sum += partial[5 * b + 0];
    ratio_sum += partial[5 * b + 1];
    ratio_min = fmin(ratio_min, partial[5 * b + 2]);
    ratio_max = fmax(ratio_max, partial[5 * b + 3]);
    clipped += partial[5 * b + 4];
  }
  loss_sum = block_reduce(loss_sum, Sum{}, shared);
  ratio_sum = block_reduce(ratio_sum, Sum{}, shared);
  clipped = block_reduce(clipped, Sum{}, shared);
  ratio_min = block_reduce(ratio_min, Min{}, shared);
  ratio_max = block_reduce(ratio_max, Max{}, shared);
  if (threadIdx.x == 0) {
    stats[0] = loss_sum;
    stats[1] = ratio_sum;
    stats[2] = ratio_min;
    stats[3] = ratio_max;
    stats[4] = clipped;
  }
}

template <typename T>
void launch(int64_t n, const void* new_logp, const void* old_logp, const void* adv, double clip_range,
            bool has_adv_clip, double adv_clip_max, void* ratio_out, void* grad_out, double* stats,
            double* workspace, cudaStream_t stream) {
  const int64_t blocks = n == 0 ? 1 : (n + kClippedLossBlock - 1) / kClippedLossBlock;
  // Bounds rounded to T once, from double, as torch does for a clamp with Python-float bounds.
  clipped_loss_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(new_logp), static_cast<const T*>(old_logp), static_cast<const T*>(adv),
      static_cast<T*>(ratio_out), static_cast<T*>(grad_out), workspace, n, static_cast<T>(1.0 - clip_range),
      static_cast<T>(1.0 + clip_range), static_cast<T>(clip_range), has_adv_clip, static_cast<T>(adv_clip_max),
      n == 0 ? T(0) : T(1) / static_cast<T>(n));
  check_launch("clipped_loss_kernel");
  combine_kernel<<<1, kThreads, 0, stream>>>(workspace, stats, blocks);
  check_launch("combine_kernel");
}

}  // namespace

void clipped_loss_cuda(int64_t n, DType dtype, const void* new_logp, const void* old_logp, const void* adv,
                       double clip_range, bool has_adv_clip, double adv_clip_max, void* ratio_out, void* grad_out,
                       double* stats_out, double* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kFloat32) {
    launch<float>(n, new_logp, old_logp, adv, clip_range, has_adv_clip, adv_clip_max, ratio_out, grad_out, stats_out,
                  workspace, s);
  } else if (dtype == DType::kFloat64) {
    launch<double>(n, new_logp, old_logp, adv, clip_range, has_adv_clip, adv_clip_max, ratio_out, grad_out,
                   stats_out, workspace, s);
  } else {
    throw std::invalid_argument("fused clipped loss computes in float32 or float64; convert the inputs first");
  }
}

}  // namespace dancegrpo
