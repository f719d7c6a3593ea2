// CUDA kernel of the fused clipped-ratio loss (contract in csrc/include/dancegrpo/ops.h).
// One launch: one block per kClippedLossBlock elements writes 5 partials; the last block to
// finish combines them in a fixed order and writes the loss and statistics in the compute
// dtype (nothing is created on or read back to the host: capturable in a CUDA graph).
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
                                                               unsigned* __restrict__ count, T* __restrict__ loss_out,
                                                               T* __restrict__ stats_out, int64_t n, T lo, T hi, T clip_range, bool has_adv_clip,
                                                               T adv_clip_max, T inv_n) {
  __shared__ double shared[kThreads / 32];
  __shared__ bool is_last;
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
    __threadfence();
    is_last = atomicAdd(count, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  // The last block combines every block's partials in a fixed order and writes the outputs.
  __threadfence();
  loss_sum = 0, ratio_sum = 0, clipped = 0, ratio_min = INFINITY, ratio_max = -INFINITY;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads) {
    loss_sum += __ldcg(partial + 5 * b + 0);
    ratio_sum += __ldcg(partial + 5 * b + 1);
    ratio_min = fmin(ratio_min, __ldcg(partial + 5 * b + 2));
    ratio_max = fmax(ratio_max, __ldcg(partial + 5 * b + 3));
    clipped += __ldcg(partial + 5 * b + 4);
  }
  loss_sum = block_reduce(loss_sum, Sum{}, shared);
  ratio_sum = block_reduce(ratio_sum, Sum{}, shared);
  clipped = block_reduce(clipped, Sum{}, shared);
  ratio_min = block_reduce(ratio_min, Min{}, shared);
  ratio_max = block_reduce(ratio_max, Max{}, shared);
  if (threadIdx.x == 0) {
    const double count_n = static_cast<double>(n);
    *loss_out = static_cast<T>(loss_sum / count_n);
    stats_out[0] = static_cast<T>(ratio_sum / count_n);
    stats_out[1] = static_cast<T>(ratio_min);
    stats_out[2] = static_cast<T>(ratio_max);
    stats_out[3] = static_cast<T>(clipped / count_n);
  }
}

template <typename T>
void launch(int64_t n, const void* new_logp, const void* old_logp, const void* adv, double clip_range,
            bool has_adv_clip, double adv_clip_max, void* ratio_out, void* grad_out, void* loss_out, void* stats_out,
            void* workspace, cudaStream_t stream) {
  const int64_t blocks = clipped_loss_blocks(n);
  auto* partial = static_cast<double*>(workspace);
  auto* count = reinterpret_cast<unsigned*>(partial + 5 * blocks);
  check_cuda(cudaMemsetAsync(count, 0, sizeof(unsigned), stream), "cudaMemsetAsync");
  // Bounds rounded to T once, from double, as torch does for a clamp with Python-float bounds.
  clipped_loss_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(new_logp), static_cast<const T*>(old_logp), static_cast<const T*>(adv),
      static_cast<T*>(ratio_out), static_cast<T*>(grad_out), partial, count, static_cast<T*>(loss_out),
      static_cast<T*>(stats_out), n, static_cast<T>(1.0 - clip_range), static_cast<T>(1.0 + clip_range),
      static_cast<T>(clip_range), has_adv_clip, static_cast<T>(adv_clip_max),
      n == 0 ? T(0) : T(1) / static_cast<T>(n));
  check_launch("clipped_loss_kernel");
}

}  // namespace

void clipped_loss_cuda(int64_t n, DType dtype, const void* new_logp, const void* old_logp, const void* adv,
                       double clip_range, bool has_adv_clip, double adv_clip_max, void* ratio_out, void* grad_out,
                       void* loss_out, void* stats_out, void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kFloat32) {
    launch<float>(n, new_logp, old_logp, adv, clip_range, has_adv_clip, adv_clip_max, ratio_out, grad_out, loss_out,
                  stats_out, workspace, s);
  } else if (dtype == DType::kFloat64) {
    launch<double>(n, new_logp, old_logp, adv, clip_range, has_adv_clip, adv_clip_max, ratio_out, grad_out,
                   loss_out, stats_out, workspace, s);
  } else {
    throw std::invalid_argument("fused clipped loss computes in float32 or float64; convert the inputs first");
  }
}

}  // namespace dancegrpo
