// CPU kernels of the fused SDE step (see csrc/include/dancegrpo/ops.h for the contract).
//
// Work is split into (sample, chunk) items of kSdeChunk elements; OpenMP runs the items in
// parallel and each writes its own partial sum, which are added per sample in a fixed order
// afterwards and turned into the log-prob here (no tensor ops after the kernel). The rollout kernel scores the action it just stored by calling the very same
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

enum class Mode { kSample, kLogProb, kBackward };

template <typename V, typename X, typename Acc>
void run(Mode mode, const SdeStepProblem& p, const void* action_ptr, void* out_ptr, const void* grad_ptr,
         void* log_prob_ptr) {
  const auto* v = static_cast<const V*>(p.model_output);
  const auto* x = static_cast<const X*>(p.sample);
  const int64_t n = p.numel;
  const int64_t chunks = sde_num_chunks(n);
  const int64_t items = p.batch * chunks;
  // Per-sample coefficients from the table: the stored compute-type values, narrowed exactly.
  std::vector<int64_t> rows(static_cast<size_t>(p.batch));
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t row = sde_row(p, b);
    if (row < 0 || row >= p.rows) {
      throw std::out_of_range("fused SDE step: sample " + std::to_string(b) + " asks for step-coefficient row " +
                              std::to_string(row) + ", but the table has " + std::to_string(p.rows) +
                              " rows (a step index outside the sampler's steps)");
    }
    rows[static_cast<size_t>(b)] = row;
  }
  auto coef = [&](int64_t b, int k) { return p.coefs[rows[static_cast<size_t>(b)] * kSdeCoefs + k]; };
  std::vector<double> partial(mode == Mode::kBackward ? 0 : static_cast<size_t>(items), 0.0);
  std::vector<Acc> scale(mode == Mode::kBackward ? static_cast<size_t>(p.batch) : 0);
  if (mode == Mode::kBackward) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const double s = coef(b, 2);
      const double g = static_cast<double>(static_cast<const Acc*>(grad_ptr)[b]);
      scale[static_cast<size_t>(b)] = static_cast<Acc>(g * coef(b, 1) / (s * s * static_cast<double>(n)));
    }
  }

  // Threads only for more than two chunks of work: forking costs more than a small step.
  DANCEGRPO_PRAGMA(omp parallel for schedule(static) if (items > 1 && p.batch * n > 2 * kSdeChunk))
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / chunks;
    const int64_t start = (item % chunks) * kSdeChunk;
    const int64_t len = n - start < kSdeChunk ? n - start : kSdeChunk;
    if (len <= 0) continue;
    const int64_t offset = b * n + start;
    const auto cx = static_cast<Acc>(coef(b, 0)), cv = static_cast<Acc>(coef(b, 1));
    if (mode == Mode::kSample) {
      auto* next = static_cast<X*>(out_ptr) + offset;
      chunk_sample<V, X, Acc>(v + offset, x + offset, static_cast<const X*>(action_ptr) + offset, next, cx, cv,
                              static_cast<Acc>(coef(b, 2)), len);
      partial[item] = chunk_sumsq<V, X, Acc>(v + offset, x + offset, next, cx, cv, len);
    } else if (mode == Mode::kLogProb) {
      partial[item] = chunk_sumsq<V, X, Acc>(v + offset, x + offset, static_cast<const X*>(action_ptr) + offset,
                                             cx, cv, len);
    } else {
      chunk_backward<V, X, Acc>(v + offset, x + offset, static_cast<const X*>(action_ptr) + offset,
                                static_cast<V*>(out_ptr) + offset, cx, cv, scale[static_cast<size_t>(b)], len);
    }
  }
  if (mode == Mode::kBackward) return;
  auto* log_prob = static_cast<Acc*>(log_prob_ptr);
  for (int64_t b = 0; b < p.batch; ++b) {
    double sumsq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sumsq += partial[b * chunks + c];
    const double s = coef(b, 2);
    log_prob[b] = static_cast<Acc>(-(sumsq / static_cast<double>(n)) / (2.0 * s * s) - coef(b, 3) - kHalfLogTwoPi);
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
void dispatch(Mode mode, const SdeStepProblem& p, const void* action, void* out, const void* grad, void* log_prob) {
  const DType lt = p.latent_dtype, ot = p.output_dtype;
  if (lt == DType::kFloat32 && ot == DType::kFloat32) return run<float, float, float>(mode, p, action, out, grad, log_prob);
  if (lt == DType::kFloat64 && ot == DType::kFloat64) return run<double, double, double>(mode, p, action, out, grad, log_prob);
  if (lt == DType::kBFloat16 && ot == DType::kBFloat16) return run<bf16_t, bf16_t, float>(mode, p, action, out, grad, log_prob);
  if (lt == DType::kFloat16 && ot == DType::kFloat16) return run<f16_t, f16_t, float>(mode, p, action, out, grad, log_prob);
  if (lt == DType::kFloat32 && ot == DType::kBFloat16) return run<bf16_t, float, float>(mode, p, action, out, grad, log_prob);
  if (lt == DType::kFloat32 && ot == DType::kFloat16) return run<f16_t, float, float>(mode, p, action, out, grad, log_prob);
  throw std::invalid_argument(std::string("fused SDE step: unsupported dtypes (model_output ") + dtype_name(ot) +
                              ", latents " + dtype_name(lt) +
                              "); use one dtype for all, or a bfloat16/float16 model output with float32 latents");
}

}  // namespace

void sde_step_sample_cpu(const SdeStepProblem& p, const void* noise, void* next, void* log_prob) {
  dispatch(Mode::kSample, p, noise, next, nullptr, log_prob);
}

void sde_step_log_prob_cpu(const SdeStepProblem& p, const void* prev, void* log_prob) {
  dispatch(Mode::kLogProb, p, prev, nullptr, nullptr, log_prob);
}

void sde_step_backward_cpu(const SdeStepProblem& p, const void* prev, const void* grad_log_prob, void* grad_v) {
  dispatch(Mode::kBackward, p, prev, grad_v, grad_log_prob, nullptr);
}

}  // namespace dancegrpo
