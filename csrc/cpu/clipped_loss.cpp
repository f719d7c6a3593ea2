// CPU kernel of the fused clipped-ratio loss (contract in csrc/include/dancegrpo/ops.h).
//
// One pass computes, per element, the ratio, the loss term and its gradient, and per chunk
// the partial loss sum, ratio sum/min/max and clip count; chunks are combined in a fixed
// order so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "dancegrpo/ops.h"
#include "simd.h"

namespace dancegrpo {
namespace {

constexpr int64_t kLossChunk = 4096;

template <typename T>
ClippedLossStats chunk_loss(const T* new_logp, const T* old_logp, const T* adv, int64_t len, T lo, T hi,
                            T clip_range, bool has_adv_clip, T adv_clip_max, T inv_n, T* ratio_out,
                            T* grad_out) {
  ClippedLossStats s;
  s.ratio_min = INFINITY;
  s.ratio_max = -INFINITY;
  double loss_sum = 0.0, ratio_sum = 0.0;
  for (int64_t i = 0; i < len; ++i) {
    const T r = std::exp(new_logp[i] - old_logp[i]);
    T a = adv[i];
    if (has_adv_clip) a = std::min(std::max(a, -adv_clip_max), adv_clip_max);
    const T unclipped = -a * r;
    const T clipped = -a * std::min(std::max(r, lo), hi);
    const T d_unclipped = -a;
    const T d_clipped = (r >= lo && r <= hi) ? -a : T(0);
    // torch.maximum's subgradient: the larger branch, or half of each on a tie.
    T d_ratio;
    if (unclipped > clipped) {
      d_ratio = d_unclipped;
    } else if (unclipped < clipped) {
      d_ratio = d_clipped;
    } else {
      d_ratio = T(0.5) * (d_unclipped + d_clipped);
    }
    ratio_out[i] = r;
    grad_out[i] = d_ratio * r * inv_n;
    loss_sum += static_cast<double>(unclipped > clipped ? unclipped : clipped);
    ratio_sum += static_cast<double>(r);
    s.ratio_min = std::min(s.ratio_min, static_cast<double>(r));
    s.ratio_max = std::max(s.ratio_max, static_cast<double>(r));
    s.clipped += std::abs(r - T(1)) > clip_range ? 1 : 0;
  }
  s.loss_sum = loss_sum;
  s.ratio_sum = ratio_sum;
  return s;
}

template <typename T>
void run(int64_t n, const void* new_logp, const void* old_logp, const void* adv, double clip_range,
         bool has_adv_clip, double adv_clip_max, void* ratio_out, void* grad_out, ClippedLossStats* stats) {
  const int64_t chunks = n == 0 ? 0 : (n + kLossChunk - 1) / kLossChunk;
  std::vector<ClippedLossStats> partial(static_cast<size_t>(chunks));
  // Bounds are rounded to T once, as torch does when it clamps a T tensor with double scalars.
  const T lo = static_cast<T>(1.0 - clip_range), hi = static_cast<T>(1.0 + clip_range);
  const T inv_n = n == 0 ? T(0) : T(1) / static_cast<T>(n);
  DANCEGRPO_PRAGMA(omp parallel for schedule(static) if (chunks > 1))
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * kLossChunk;
    const int64_t len = std::min(kLossChunk, n - start);
    partial[c] = chunk_loss<T>(static_cast<const T*>(new_logp) + start, static_cast<const T*>(old_logp) + start,
                               static_cast<const T*>(adv) + start, len, lo, hi, static_cast<T>(clip_range),
                               has_adv_clip, static_cast<T>(adv_clip_max), inv_n,
                               static_cast<T*>(ratio_out) + start, static_cast<T*>(grad_out) + start);
  }
  ClippedLossStats total;
  total.ratio_min = INFINITY;
  total.ratio_max = -INFINITY;
  for (const auto& p : partial) {
    total.loss_sum += p.loss_sum;
    total.ratio_sum += p.ratio_sum;
    total.ratio_min = std::min(total.ratio_min, p.ratio_min);
    total.ratio_max = std::max(total.ratio_max, p.ratio_max);
    total.clipped += p.clipped;
  }
  *stats = total;
}

}  // namespace

void clipped_loss_cpu(int64_t n, DType dtype, const void* new_logp, const void* old_logp, const void* adv,
                      double clip_range, bool has_adv_clip, double adv_clip_max, void* ratio_out,
                      void* grad_out, ClippedLossStats* stats) {
  if (dtype == DType::kFloat32) {
    run<float>(n, new_logp, old_logp, adv, clip_range, has_adv_clip, adv_clip_max, ratio_out, grad_out, stats);
  } else if (dtype == DType::kFloat64) {
    run<double>(n, new_logp, old_logp, adv, clip_range, has_adv_clip, adv_clip_max, ratio_out, grad_out, stats);
  } else {
    throw std::invalid_argument("fused clipped loss computes in float32 or float64; convert the inputs first");
  }
}

}  // namespace dancegrpo
