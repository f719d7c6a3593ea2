// Tensor checks and conversions shared by the CPU and CUDA torch bindings.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "dancegrpo/ops.h"

namespace dancegrpo {
namespace binding {

inline DType to_dtype(const at::Tensor& t, const char* name) {
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

// float64 for float64 latents, else float32 (never 16-bit).
inline at::ScalarType compute_type(const at::Tensor& latent) {
  return latent.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_device(const at::Tensor& t, const char* name, at::DeviceType expected, const at::Tensor& first) {
  TORCH_CHECK(t.device().type() == expected, name, " must be a ", c10::DeviceTypeName(expected),
              " tensor for this backend, got ", t.device());
  TORCH_CHECK(t.device() == first.device(), name, " is on ", t.device(), " but sample is on ", first.device());
}

// Validated, contiguous inputs of an SDE-step call; the tensors keep the buffers alive.
struct SdeInputs {
  at::Tensor model_output, sample, action, coefs, index;
  at::ScalarType compute;
  SdeStepProblem problem;
};

// coefs: (R, kSdeCoefs) float64 table; index: (B,) int64 rows, or undefined (R == B, or R == 1).
// Checks are on metadata only: nothing here reads tensor values.
inline SdeInputs prepare_sde(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& action,
                             const char* action_name, const at::Tensor& coefs, const std::optional<at::Tensor>& index,
                             at::DeviceType device) {
  for (const auto& [t, name] : {std::pair{&model_output, "model_output"}, {&sample, "sample"}, {&action, action_name},
                                {&coefs, "coefs"}}) {
    check_device(*t, name, device, sample);
  }
  TORCH_CHECK(sample.dim() >= 1, "sample must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), "model_output shape ", model_output.sizes(),
                    " differs from sample shape ", sample.sizes());
  TORCH_CHECK_VALUE(action.sizes() == sample.sizes(), action_name, " shape ", action.sizes(),
                    " differs from sample shape ", sample.sizes());
  TORCH_CHECK_TYPE(action.scalar_type() == sample.scalar_type(), action_name, " dtype ", action.scalar_type(),
                   " differs from sample dtype ", sample.scalar_type());
  const int64_t batch = sample.size(0);
  TORCH_CHECK_VALUE(coefs.dim() == 2 && coefs.size(1) == kSdeCoefs, "coefs must have shape (rows, ", kSdeCoefs,
                    "), got ", coefs.sizes());
  TORCH_CHECK_TYPE(coefs.scalar_type() == at::kDouble, "coefs must be float64, got ", coefs.scalar_type());
  const bool has_index = index.has_value() && index->defined();
  if (has_index) {
    check_device(*index, "index", device, sample);
    TORCH_CHECK_VALUE(index->dim() == 1 && index->size(0) == batch, "index must have shape (", batch, ",), got ",
                      index->sizes());
    TORCH_CHECK_TYPE(index->scalar_type() == at::kLong, "index must be int64, got ", index->scalar_type());
  } else {
    TORCH_CHECK_VALUE(coefs.size(0) == batch || coefs.size(0) == 1, "without an index, coefs needs one row per "
                      "sample (", batch, ") or a single row, got ", coefs.size(0));
  }
  SdeInputs in{model_output.contiguous(), sample.contiguous(), action.contiguous(), coefs.contiguous(),
               has_index ? index->contiguous() : at::Tensor(), compute_type(sample), {}};
  auto& p = in.problem;
  p.batch = batch;
  p.numel = batch == 0 ? 0 : sample.numel() / batch;
  p.latent_dtype = to_dtype(sample, "sample");
  p.output_dtype = to_dtype(model_output, "model_output");
  p.model_output = in.model_output.data_ptr();
  p.sample = in.sample.data_ptr();
  p.coefs = in.coefs.data_ptr<double>();
  p.rows = in.coefs.size(0);
  p.index = has_index ? in.index.data_ptr<int64_t>() : nullptr;
  return in;
}

// The incoming gradient of the log-probs as (B,) in the compute type, contiguous.
inline at::Tensor grad_log_prob_for(const at::Tensor& grad_logp, const SdeInputs& in) {
  TORCH_CHECK_VALUE(grad_logp.dim() == 1 && grad_logp.size(0) == in.problem.batch, "grad_logp must have shape (",
                    in.problem.batch, ",), got ", grad_logp.sizes());
  return grad_logp.to(in.sample.device(), in.compute).contiguous();
}

// Checked loss inputs converted to the compute dtype (float32, or float64).
struct LossInputs {
  at::Tensor new_logp, old_logp, adv;
  at::ScalarType dtype;
  int64_t n;
};

inline LossInputs prepare_loss(const at::Tensor& new_logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                               double clip_range, at::DeviceType device) {
  for (const auto& [t, name] : {std::pair{&new_logp, "new_logp"}, {&old_logp, "old_logp"}, {&advantages, "advantages"}}) {
    check_device(*t, name, device, new_logp);
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
  return {new_logp.to(acc).contiguous(), old_logp.to(acc).contiguous(), advantages.to(acc).contiguous(), acc, n};
}

}  // namespace binding
}  // namespace dancegrpo

// The Python functions of a fused-op extension, the same for the CPU and the CUDA one: each
// translation unit defines sde_step_sample, sde_step_log_prob, sde_step_backward and
// clipped_loss (in its own namespace) and expands this inside PYBIND11_MODULE.
#define DANCEGRPO_DEFINE_FUSED_OPS(m)                                                                      \
  do {                                                                                                     \
    (m).def("sde_step_sample", &sde_step_sample, "rollout SDE step: (next_sample, log_prob)",              \
            pybind11::arg("model_output"), pybind11::arg("sample"), pybind11::arg("noise"),                \
            pybind11::arg("coefs"), pybind11::arg("index") = pybind11::none());                            \
    (m).def("sde_step_log_prob", &sde_step_log_prob, "training SDE step: log_prob of prev_sample",         \
            pybind11::arg("model_output"), pybind11::arg("sample"), pybind11::arg("prev_sample"),          \
            pybind11::arg("coefs"), pybind11::arg("index") = pybind11::none());                            \
    (m).def("sde_step_backward", &sde_step_backward, "gradient of the log-prob w.r.t. model_output",       \
            pybind11::arg("grad_logp"), pybind11::arg("model_output"), pybind11::arg("sample"),            \
            pybind11::arg("prev_sample"), pybind11::arg("coefs"), pybind11::arg("index") = pybind11::none()); \
    (m).def("clipped_loss", &clipped_loss, "clipped-ratio loss: (loss, ratio, grad_new, stats)");           \
    (m).attr("source_hash") = pybind11::int_(static_cast<uint64_t>(DANCEGRPO_SOURCE_HASH));                \
  } while (0)
