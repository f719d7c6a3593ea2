// Standalone checks of the CPU kernels against naive double-precision loops (no torch):
// values, rollout/training bit-identity, independence from the thread count, bf16 rounding.
// Built and run by CMakeLists.txt (ctest). Exit code 0 when every check passes.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dancegrpo/dtypes.h"
#include "dancegrpo/ops.h"

using namespace dancegrpo;

static int failures = 0;

static void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

static std::vector<float> randn(size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> out(n);
  for (auto& v : out) v = dist(gen);
  return out;
}

static void test_sde_float32() {
  const int64_t batch = 3, numel = 20000;  // three chunks per sample, the last one partial
  const size_t n = static_cast<size_t>(batch * numel);
  auto x = randn(n, 1), v = randn(n, 2), noise = randn(n, 3);
  std::vector<float> cx = {0.97f, 1.01f, 0.9f}, cv = {-0.1f, -0.05f, -0.2f}, std = {0.3f, 0.2f, 0.1f};
  SdeStepProblem p;
  p.batch = batch;
  p.numel = numel;
  p.model_output = v.data();
  p.sample = x.data();
  p.coef_x = cx.data();
  p.coef_v = cv.data();
  std::vector<float> next(n);
  std::vector<double> sumsq_rollout(batch), sumsq_train(batch), sumsq_one_thread(batch);
  sde_step_sample_cpu(p, std.data(), noise.data(), next.data(), sumsq_rollout.data());
  sde_step_sumsq_cpu(p, next.data(), sumsq_train.data());
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  sde_step_sumsq_cpu(p, next.data(), sumsq_one_thread.data());
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  for (int64_t b = 0; b < batch; ++b) {
    double naive = 0.0;
    for (int64_t i = 0; i < numel; ++i) {
      const size_t k = static_cast<size_t>(b * numel + i);
      const double mean = static_cast<double>(cx[b]) * x[k] + static_cast<double>(cv[b]) * v[k];
      const double d = static_cast<double>(next[k]) - mean;
      naive += d * d;
    }
    check(std::fabs(sumsq_rollout[b] - naive) <= 1e-5 * naive, "float32 sum of squares matches the naive loop");
    check(sumsq_rollout[b] == sumsq_train[b], "rollout and training sums are bit-identical");
    check(sumsq_train[b] == sumsq_one_thread[b], "the sum does not depend on the thread count");
  }
  // backward: grad = scale * (prev - mean)
  std::vector<float> scale = {2.0f, -1.0f, 0.5f}, grad(n);
  sde_step_backward_cpu(p, next.data(), scale.data(), grad.data());
  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < numel; ++i) {
      const size_t k = static_cast<size_t>(b * numel + i);
      const double mean = static_cast<double>(cx[b]) * x[k] + static_cast<double>(cv[b]) * v[k];
      const double expected = scale[b] * (static_cast<double>(next[k]) - mean);
      worst = std::fmax(worst, std::fabs(grad[k] - expected));
    }
  }
  check(worst < 1e-5, "backward matches the naive loop");
}

static void test_bf16_rounding() {
  // Round-to-nearest-even on the bits: ties go to the even neighbour, NaN stays NaN.
  check(to_bf16(1.0f).bits == 0x3F80, "bf16(1.0)");
  check(to_bf16(bits_to_float(0x3F808000u)).bits == 0x3F80, "a tie rounds to even (down)");
  check(to_bf16(bits_to_float(0x3F818000u)).bits == 0x3F82, "a tie rounds to even (up)");
  check(to_bf16(bits_to_float(0x3F808001u)).bits == 0x3F81, "above a tie rounds up");
  check((to_bf16(std::nanf("")).bits & 0x7FC0) == 0x7FC0, "NaN stays NaN");
  check(to_float(to_f16(65504.0f)) == 65504.0f, "f16 max");
  check(std::isinf(to_float(to_f16(65520.0f))), "f16 overflow to inf");
  check(to_float(to_f16(5.9604644775390625e-08f)) == 5.9604644775390625e-08f, "f16 smallest subnormal");
  check(to_float(to_f16(2.9802322387695312e-08f)) == 0.0f, "half the smallest subnormal ties to zero (even)");
}

static void test_clipped_loss() {
  const int64_t n = 9000;
  auto old_logp = randn(static_cast<size_t>(n), 5), adv = randn(static_cast<size_t>(n), 6, 3.0f);
  auto delta = randn(static_cast<size_t>(n), 7, 1e-3f);
  std::vector<float> new_logp(static_cast<size_t>(n)), ratio(static_cast<size_t>(n)), grad(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) new_logp[i] = old_logp[i] + delta[i];
  ClippedLossStats s;
  const double clip = 1e-3, adv_max = 5.0;
  clipped_loss_cpu(n, DType::kFloat32, new_logp.data(), old_logp.data(), adv.data(), clip, true, adv_max,
                   ratio.data(), grad.data(), &s);
  double loss = 0.0;
  int64_t clipped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = std::exp(static_cast<double>(new_logp[i]) - old_logp[i]);
    const double a = std::fmin(std::fmax(static_cast<double>(adv[i]), -adv_max), adv_max);
    loss += std::fmax(-a * r, -a * std::fmin(std::fmax(r, 1.0 - clip), 1.0 + clip));
    clipped += std::fabs(r - 1.0) > clip ? 1 : 0;
  }
  check(std::fabs(s.loss_sum / n - loss / n) < 1e-6, "clipped loss matches the naive loop");
  check(std::llabs(s.clipped - clipped) <= 2, "clip count matches (up to exp rounding at the bounds)");
}

int main() {
  test_sde_float32();
  test_bf16_rounding();
  test_clipped_loss();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all CPU kernel checks passed\n");
  return 0;
}
