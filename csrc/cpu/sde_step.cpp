// CPU kernels of the fused SDE step (see csrc/include/dancegrpo/ops.h for the contract).
//
// Work is split into (sample, chunk) items of kSdeChunk elements; OpenMP runs the items in
// parallel and each writes its own partial sum, which are added per sample in a fixed order
// afterwards. The rollout kernel scores the action it just stored by calling the very same
// chunk function the training kernel uses, while the chunk is still in cache: one pass over
// main memory, and bit-identical log-probs in both modes.
//
// Build with -ffp-contract=off (setup.py / CMakeLists.txt do) so that `mean` is rounded the
// same way wherever it is computed.
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dancegrpo/dtypes.h"
#include "dancegrpo/ops.h"
#include "simd.h"

namespace dancegrpo {
namespace {

// Sub-block of a chunk summed in the compute type before adding to the double total:
// vector-friendly and accurate to ~1e-7 relative.
constexpr int64_t kSubBlock = 512;

template <typename V, typename X, typename Acc>
DANCEGRPO_TARGET_CLONES double chunk_sumsq(const V* v, const X* x, const X* prev, Acc cx, Acc cv,
                                           int64_t len) {
  double total = 0.0;
  for (int64_t start = 0; start < len; start += kSubBlock) {
    const int64_t stop = start + kSubBlock < len ? start + kSubBlock : len;
    Acc acc = 0;
    DANCEGRPO_PRAGMA(omp simd reduction(+ : acc))
    for (int64_t i = start; i < stop; ++i) {
      const Acc mean = cx * load_as<Acc>(x, i) + cv * load_as<Acc>(v, i);
      const Acc diff = load_as<Acc>(prev, i) - mean;
      acc += diff * diff;
    }
    total += static_cast<double>(acc);
  }
  return total;
}

template <typename V, typename X, typename Acc>
DANCEGRPO_TARGET_CLONES void chunk_sample(const V* v, const X* x, const X* noise, X* next, Acc cx, Acc cv,
                                          Acc std, int64_t len) {
  DANCEGRPO_PRAGMA(omp simd)
  for (int64_t i = 0; i < len; ++i) {
    const Acc mean = cx * load_as<Acc>(x, i) + cv * load_as<Acc>(v, i);
    next[i] = convert_to<X>(mean + std * load_as<Acc>(noise, i));
  }
}

template <typename V, typename X, typename Acc>
DANCEGRPO_TARGET_CLONES void chunk_backward(const V* v, const X* x, const X* prev, V* grad, Acc cx, Acc cv,
                                            Acc scale, int64_t len) {
  DANCEGRPO_PRAGMA(omp simd)
  for (int64_t i = 0; i < len; ++i) {
    const Acc mean = cx * load_as<Acc>(x, i) + cv * load_as<Acc>(v, i);
    grad[i] = convert_to<V>(scale * (load_as<Acc>(prev, i) - mean));
  }
}

enum class Mode { kSample, kSumsq, kBackward };

template <typename V, typename X, typename Acc>
void run(Mode mode, const SdeStepProblem& p, const void* std_ptr, const void* action_ptr, void* out_ptr,
         const void* scale_ptr, double* sumsq) {
  const auto* v = static_cast<const V*>(p.model_output);
  const auto* x = static_cast<const X*>(p.sample);
  const auto* cx = static_cast<const Acc*>(p.coef_x);
  const auto* cv = static_cast<const Acc*>(p.coef_v);
  const int64_t n = p.numel;
  const int64_t chunks = sde_num_chunks(n);
  const int64_t items = p.batch * chunks;
  std::vector<double> partial(mode == Mode::kBackward ? 0 : static_cast<size_t>(items), 0.0);

  DANCEGRPO_PRAGMA(omp parallel for schedule(static) if (items > 1))
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / chunks;
    const int64_t start = (item % chunks) * kSdeChunk;
    const int64_t len = n - start < kSdeChunk ? n - start : kSdeChunk;
    if (len <= 0) continue;
    const int64_t offset = b * n + start;
    if (mode == Mode::kSample) {
      auto* next = static_cast<X*>(out_ptr) + offset;
      chunk_sample<V, X, Acc>(v + offset, x + offset, static_cast<const X*>(action_ptr) + offset, next, cx[b],
                              cv[b], static_cast<const Acc*>(std_ptr)[b], len);
      partial[item] = chunk_sumsq<V, X, Acc>(v + offset, x + offset, next, cx[b], cv[b], len);
    } else if (mode == Mode::kSumsq) {
      partial[item] = chunk_sumsq<V, X, Acc>(v + offset, x + offset, static_cast<const X*>(action_ptr) + offset,
                                             cx[b], cv[b], len);
    } else {
      chunk_backward<V, X, Acc>(v + offset, x + offset, static_cast<const X*>(action_ptr) + offset,
                                static_cast<V*>(out_ptr) + offset, cx[b], cv[b],
                                static_cast<const Acc*>(scale_ptr)[b], len);
    }
  }
  if (mode == Mode::kBackward) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    sumsq[b] = total;
  }
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

// The supported (model_output, latent) dtype pairs: equal, or a 16-bit model output (autocast)
// with float32 latents.
void dispatch(Mode mode, const SdeStepProblem& p, const void* std_ptr, const void* action, void* out,
              const void* scale, double* sumsq) {
  const DType lt = p.latent_dtype, ot = p.output_dtype;
  if (lt == DType::kFloat32 && ot == DType::kFloat32) return run<float, float, float>(mode, p, std_ptr, action, out, scale, sumsq);
  if (lt == DType::kFloat64 && ot == DType::kFloat64) return run<double, double, double>(mode, p, std_ptr, action, out, scale, sumsq);
  if (lt == DType::kBFloat16 && ot == DType::kBFloat16) return run<bf16_t, bf16_t, float>(mode, p, std_ptr, action, out, scale, sumsq);
  if (lt == DType::kFloat16 && ot == DType::kFloat16) return run<f16_t, f16_t, float>(mode, p, std_ptr, action, out, scale, sumsq);
  if (lt == DType::kFloat32 && ot == DType::kBFloat16) return run<bf16_t, float, float>(mode, p, std_ptr, action, out, scale, sumsq);
  if (lt == DType::kFloat32 && ot == DType::kFloat16) return run<f16_t, float, float>(mode, p, std_ptr, action, out, scale, sumsq);
  throw std::invalid_argument(std::string("fused SDE step: unsupported dtypes (model_output ") + dtype_name(ot) +
                              ", latents " + dtype_name(lt) +
                              "); use one dtype for all, or a bfloat16/float16 model output with float32 latents");
}

}  // namespace

void sde_step_sample_cpu(const SdeStepProblem& p, const void* std, const void* noise, void* next, double* sumsq) {
  dispatch(Mode::kSample, p, std, noise, next, nullptr, sumsq);
}

void sde_step_sumsq_cpu(const SdeStepProblem& p, const void* prev, double* sumsq) {
  dispatch(Mode::kSumsq, p, nullptr, prev, nullptr, nullptr, sumsq);
}

void sde_step_backward_cpu(const SdeStepProblem& p, const void* prev, const void* grad_scale, void* grad_v) {
  dispatch(Mode::kBackward, p, nullptr, prev, grad_v, grad_scale, nullptr);
}

}  // namespace dancegrpo
