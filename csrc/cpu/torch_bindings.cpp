// Torch extension `dancegrpo._ops_cpu`: tensor checks and conversions around the CPU kernels.
// The Python package (dancegrpo/ops) registers these functions as torch.library custom ops.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

#include "dancegrpo/ops.h"

#ifndef DANCEGRPO_SOURCE_HASH
#define DANCEGRPO_SOURCE_HASH 0ULL
#endif

namespace {

using dancegrpo::DType;

constexpr double kHalfLogTwoPi = 0.91893853320467274178;  // 0.5 * log(2 pi)

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be a floating tensor (float32, float64, bfloat16 or float16), got ",
                       t.scalar_type());
  }
  return DType::kFloat32;
}

at::ScalarType compute_type(const at::Tensor& latent) {
  return latent.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU for the cpp backend, got ", t.device(),
              "; use backend='cuda' or 'triton' for GPU tensors");
}

// Validates the SDE-step inputs and fills a problem description; returns contiguous copies
// that must stay alive while the kernel runs.
struct SdeInputs {
  at::Tensor model_output, sample, action, coef_x, coef_v, std;
  dancegrpo::SdeStepProblem problem;
};

SdeInputs prepare(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& action,
                  const char* action_name, const at::Tensor& coef_x, const at::Tensor& coef_v, const at::Tensor& std) {
  for (const auto& [t, name] : {std::pair{&model_output, "model_output"}, {&sample, "sample"}, {&action, action_name},
                                {&coef_x, "coef_x"}, {&coef_v, "coef_v"}, {&std, "std"}}) {
    check_cpu(*t, name);
  }
  TORCH_CHECK(sample.dim() >= 1, "sample must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(model_output.sizes() == sample.sizes(), "model_output shape ", model_output.sizes(),
              " differs from sample shape ", sample.sizes());
  TORCH_CHECK(action.sizes() == sample.sizes(), action_name, " shape ", action.sizes(), " differs from sample shape ",
              sample.sizes());
  TORCH_CHECK_TYPE(action.scalar_type() == sample.scalar_type(), action_name, " dtype ", action.scalar_type(),
                   " differs from sample dtype ", sample.scalar_type());
  const int64_t batch = sample.size(0);
  const auto acc = compute_type(sample);
  for (const auto& [t, name] : {std::pair{&coef_x, "coef_x"}, {&coef_v, "coef_v"}, {&std, "std"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, name, " must have shape (", batch, ",), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, " must be ", acc, " for ", sample.scalar_type(),
                     " latents, got ", t->scalar_type());
  }
  SdeInputs in{model_output.contiguous(), sample.contiguous(), action.contiguous(),
               coef_x.contiguous(),       coef_v.contiguous(), std.contiguous(), {}};
  auto& p = in.problem;
  p.batch = batch;
  p.numel = batch == 0 ? 0 : sample.numel() / batch;
  p.latent_dtype = to_dtype(sample, "sample");
  p.output_dtype = to_dtype(model_output, "model_output");
  p.model_output = in.model_output.data_ptr();
  p.sample = in.sample.data_ptr();
  p.coef_x = in.coef_x.data_ptr();
  p.coef_v = in.coef_v.data_ptr();
  return in;
}

// logp_b = -(sumsq_b / n) / (2 std_b^2) - log(std_b) - log(2 pi) / 2, in double, then cast.
at::Tensor log_prob_from_sumsq(const at::Tensor& sumsq, const at::Tensor& std, int64_t numel) {
  const auto s = std.to(at::kDouble);
  auto logp = -(sumsq / static_cast<double>(numel)) / (2.0 * s * s) - at::log(s) - kHalfLogTwoPi;
  return logp.to(std.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sde_step_sample(const at::Tensor& model_output, const at::Tensor& sample,
                                                   const at::Tensor& noise, const at::Tensor& coef_x,
                                                   const at::Tensor& coef_v, const at::Tensor& std) {
  auto in = prepare(model_output, sample, noise, "noise", coef_x, coef_v, std);
  auto next = at::empty_like(in.sample);
  auto sumsq = at::empty({in.problem.batch}, sample.options().dtype(at::kDouble));
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_sample_cpu(in.problem, in.std.data_ptr(), in.action.data_ptr(), next.data_ptr(),
                                   sumsq.data_ptr<double>());
  }
  return {next, log_prob_from_sumsq(sumsq, in.std, in.problem.numel)};
}

at::Tensor sde_step_log_prob(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& prev_sample,
                             const at::Tensor& coef_x, const at::Tensor& coef_v, const at::Tensor& std) {
  auto in = prepare(model_output, sample, prev_sample, "prev_sample", coef_x, coef_v, std);
  auto sumsq = at::empty({in.problem.batch}, sample.options().dtype(at::kDouble));
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_sumsq_cpu(in.problem, in.action.data_ptr(), sumsq.data_ptr<double>());
  }
  return log_prob_from_sumsq(sumsq, in.std, in.problem.numel);
}

// d logp_b / d v = coef_v_b * (prev - mean) / (std_b^2 n), times the incoming grad_b.
at::Tensor sde_step_backward(const at::Tensor& grad_logp, const at::Tensor& model_output, const at::Tensor& sample,
                             const at::Tensor& prev_sample, const at::Tensor& coef_x, const at::Tensor& coef_v,
                             const at::Tensor& std) {
  auto in = prepare(model_output, sample, prev_sample, "prev_sample", coef_x, coef_v, std);
  check_cpu(grad_logp, "grad_logp");
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == in.problem.batch, "grad_logp must have shape (",
              in.problem.batch, ",), got ", grad_logp.sizes());
  const auto s = in.std.to(at::kDouble);
  const auto scale = (grad_logp.to(at::kDouble) * in.coef_v.to(at::kDouble) /
                      (s * s * static_cast<double>(in.problem.numel)))
                         .to(in.std.scalar_type())
                         .contiguous();
  auto grad = at::empty_like(in.model_output);
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::sde_step_backward_cpu(in.problem, in.action.data_ptr(), scale.data_ptr(), grad.data_ptr());
  }
  return grad;
}

// Returns (loss, ratio, grad_new, stats) with stats = [ratio_mean, ratio_min, ratio_max, clip_fraction],
// all in the compute dtype (float32, or float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clipped_loss(const at::Tensor& new_logp,
                                                                        const at::Tensor& old_logp,
                                                                        const at::Tensor& advantages, double clip_range,
                                                                        std::optional<double> adv_clip_max) {
  for (const auto& [t, name] : {std::pair{&new_logp, "new_logp"}, {&old_logp, "old_logp"}, {&advantages, "advantages"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->dim() == 1, name, " must be 1-D (N,), got shape ", t->sizes());
    to_dtype(*t, name);
  }
  TORCH_CHECK(old_logp.sizes() == new_logp.sizes() && advantages.sizes() == new_logp.sizes(), "new_logp ",
              new_logp.sizes(), ", old_logp ", old_logp.sizes(), " and advantages ", advantages.sizes(),
              " must have the same shape (N,)");
  TORCH_CHECK(clip_range > 0, "clip_range must be > 0, got ", clip_range);
  const auto acc = at::promote_types(at::promote_types(new_logp.scalar_type(), old_logp.scalar_type()), at::kFloat);
  const auto n = new_logp.size(0);
  TORCH_CHECK(n > 0, "the clipped loss needs at least one element, got N = 0");
  auto nw = new_logp.to(acc).contiguous(), od = old_logp.to(acc).contiguous(), ad = advantages.to(acc).contiguous();
  auto ratio = at::empty({n}, nw.options()), grad = at::empty({n}, nw.options());
  dancegrpo::ClippedLossStats s;
  {
    pybind11::gil_scoped_release no_gil;
    dancegrpo::clipped_loss_cpu(n, acc == at::kDouble ? DType::kFloat64 : DType::kFloat32, nw.data_ptr(), od.data_ptr(),
                                ad.data_ptr(), clip_range, adv_clip_max.has_value(), adv_clip_max.value_or(0.0),
                                ratio.data_ptr(), grad.data_ptr(), &s);
  }
  const double dn = static_cast<double>(n);
  auto loss = at::scalar_tensor(s.loss_sum / dn, nw.options());
  auto stats = at::tensor({s.ratio_sum / dn, s.ratio_min, s.ratio_max, static_cast<double>(s.clipped) / dn},
                          nw.options().dtype(at::kDouble))
                   .to(acc);
  return {loss, ratio, grad, stats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo fused ops, CPU kernels (vectorised, OpenMP)";
  m.def("sde_step_sample", &sde_step_sample, "rollout SDE step: (next_sample, log_prob)");
  m.def("sde_step_log_prob", &sde_step_log_prob, "training SDE step: log_prob of prev_sample");
  m.def("sde_step_backward", &sde_step_backward, "gradient of the log-prob w.r.t. model_output");
  m.def("clipped_loss", &clipped_loss, "clipped-ratio loss: (loss, ratio, grad_new, stats)");
  m.attr("source_hash") = pybind11::int_(static_cast<uint64_t>(DANCEGRPO_SOURCE_HASH));
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
