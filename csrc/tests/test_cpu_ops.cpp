// Standalone checks of the CPU kernels against naive double-precision loops (no torch):
// values, rollout/training bit-identity, independence from the thread count, bf16 rounding.
// Built and run by CMakeLists.txt (ctest). Exit code 0 when every check passes.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
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
  // A table of 4 step rows (coef_x, coef_v, std, log std); the samples use rows 2, 0, 3.
  const std::vector<double> cx = {0.97f, 1.5f, 1.01f, 0.9f}, cv = {-0.1f, 3.0f, -0.05f, -0.2f},
                            sd = {0.3f, 9.0f, 0.2f, 0.1f};
  std::vector<double> table;
  for (size_t r = 0; r < cx.size(); ++r) {
    for (double value : {cx[r], cv[r], sd[r], std::log(sd[r])}) table.push_back(value);
  }
  const std::vector<int64_t> rows = {2, 0, 3};
  SdeStepProblem p;
  p.batch = batch;
  p.numel = numel;
  p.model_output = v.data();
  p.sample = x.data();
  p.coefs = table.data();
  p.rows = static_cast<int64_t>(cx.size());
  p.index = rows.data();
  std::vector<float> next(n);
  std::vector<float> logp_rollout(batch), logp_train(batch), logp_one_thread(batch);
  sde_step_sample_cpu(p, noise.data(), next.data(), logp_rollout.data());
  sde_step_log_prob_cpu(p, next.data(), logp_train.data());
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  sde_step_log_prob_cpu(p, next.data(), logp_one_thread.data());
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  for (int64_t b = 0; b < batch; ++b) {
    const size_t r = static_cast<size_t>(rows[static_cast<size_t>(b)]);
    double naive = 0.0;
    for (int64_t i = 0; i < numel; ++i) {
      const size_t k = static_cast<size_t>(b * numel + i);
      const double mean = cx[r] * x[k] + cv[r] * v[k];
      const double d = static_cast<double>(next[k]) - mean;
      naive += d * d;
    }
    const double expected = -(naive / numel) / (2 * sd[r] * sd[r]) - std::log(sd[r]) - 0.5 * std::log(2 * M_PI);
    check(std::fabs(logp_rollout[b] - expected) <= 1e-5 * (1 + std::fabs(expected)),
          "float32 log-prob matches the naive loop with the sample's table row");
    check(logp_rollout[b] == logp_train[b], "rollout and training log-probs are bit-identical");
    check(logp_train[b] == logp_one_thread[b], "the log-prob does not depend on the thread count");
  }
  // backward: grad = g_b * coef_v / (std^2 numel) * (prev - mean)
  std::vector<float> grad_logp = {2.0f, -1.0f, 0.5f}, grad(n);
  sde_step_backward_cpu(p, next.data(), grad_logp.data(), grad.data());
  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    const size_t r = static_cast<size_t>(rows[static_cast<size_t>(b)]);
    const double scale = grad_logp[b] * cv[r] / (sd[r] * sd[r] * numel);
    for (int64_t i = 0; i < numel; ++i) {
      const size_t k = static_cast<size_t>(b * numel + i);
      const double mean = cx[r] * x[k] + cv[r] * v[k];
      const double expected = scale * (static_cast<double>(next[k]) - mean);
      worst = std::fmax(worst, std::fabs(grad[k] - expected) / (std::fabs(scale) + 1e-30));
    }
  }
  check(worst < 1e-4, "backward matches the naive loop");
  // a row outside the table is refused before any work
  const std::vector<int64_t> bad_rows = {0, 4, 1};
  p.index = bad_rows.data();
  bool threw = false;
  try {
    sde_step_log_prob_cpu(p, next.data(), logp_train.data());
  } catch (const std::out_of_range&) {
    threw = true;
  }
  check(threw, "an index outside the table throws std::out_of_range");
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
