"""`fused_sde_step`: one sampler step and its log-prob in one pass over the latents."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..sde import FLOW_FORMS, ScheduleValue
from . import library, reference
from .backends import op_range, resolve_backend
from .schedule import PREDICTIONS, check_schedule_value, compute_dtype, ddim_coefficients, flow_coefficients, per_sample
from .validation import check_latents, require, require_positive_std


class SdeStepOutput(NamedTuple):
    """``next_sample``: the action (sampled in rollout mode, the given prev_sample, detached, in
    training mode), in the latent dtype. ``log_prob``: (B,) mean Gaussian log-density of the
    action over its elements, float32 (float64 for float64 latents)."""

    next_sample: Tensor
    log_prob: Tensor


def fused_sde_step(
    model_output: Tensor,
    sample: Tensor,
    *,
    prediction: str = "flow",
    sigma: ScheduleValue | None = None,
    sigma_next: ScheduleValue | None = None,
    eta: ScheduleValue = 0.0,
    form: str = "dancegrpo",
    sigma_max: ScheduleValue | None = None,
    abar_t: ScheduleValue | None = None,
    abar_prev: ScheduleValue | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> SdeStepOutput:
    """A stochastic sampler step with the log-prob of its action, fused into one pass.

    Rollout mode (``noise`` given): ``next = mean + std * noise`` rounded to the latent dtype,
    and the log-prob of that stored action. Training mode (``prev_sample`` given): the
    log-prob of the recorded action, differentiable w.r.t. ``model_output``. For the same
    backend and inputs both modes give bit-identical log-probs, so the PPO ratio of the first
    update is exactly 1.

    Args:
        model_output: (B, ...) velocity (flow) or epsilon (ddim); the latent dtype, or
            bfloat16/float16 with float32 latents (autocast).
        sample: (B, ...) current latent x.
        prediction: "flow" (rectified flow: sigma, sigma_next, eta, form, sigma_max) or
            "ddim" (epsilon prediction: abar_t, abar_prev, eta); see dancegrpo.sde for the math.
        sigma, sigma_next, eta, sigma_max, abar_t, abar_prev: schedule values, each a float,
            a 0-d tensor or one value per sample (B,).
        form: "dancegrpo" or "flow_grpo" (flow only).
        noise / prev_sample: exactly one of them, (B, ...) in the latent dtype.
        backend: "torch", "cpp", "triton", "cuda" or "auto"; default from DANCEGRPO_OPS_BACKEND,
            then ops.set_default_backend(), then "auto" (see dancegrpo.ops.backends).
        validate: check std > 0 (a deterministic step, e.g. eta = 0, has no log-prob: ValueError).

    Returns:
        SdeStepOutput(next_sample, log_prob).
    """
    if (noise is None) == (prev_sample is None):
        raise ValueError("pass exactly one of noise (rollout mode) or prev_sample (training mode)")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if prediction == "flow" and form not in FLOW_FORMS:
        raise ValueError(f"unknown flow step form {form!r}; choose one of {FLOW_FORMS}")
    action, action_name = (noise, "noise") if noise is not None else (prev_sample, "prev_sample")
    check_latents(model_output, sample, action, action_name)
    for value, value_name in ((sigma, "sigma"), (sigma_next, "sigma_next"), (eta, "eta"), (sigma_max, "sigma_max"),
                              (abar_t, "abar_t"), (abar_prev, "abar_prev")):
        check_schedule_value(value, value_name, sample.shape[0])
    name = resolve_backend(backend, sample.device)

    with op_range("sde_step", name):
        if name == "torch":
            return _torch_step(model_output, sample, prediction, noise, prev_sample, validate,
                               dict(sigma=sigma, sigma_next=sigma_next, eta=eta, form=form, sigma_max=sigma_max,
                                    abar_t=abar_t, abar_prev=abar_prev))
        coef_x, coef_v, std = _coefficients(sample, prediction, sigma, sigma_next, eta, form, sigma_max, abar_t,
                                            abar_prev)
        if validate:
            require_positive_std(std)
        if noise is not None:
            next_sample, log_prob = library.sde_step_sample(model_output, sample, noise.detach(), coef_x, coef_v,
                                                            std, name)
            return SdeStepOutput(next_sample.detach(), log_prob)
        log_prob = library.sde_step_log_prob(model_output, sample, prev_sample.detach(), coef_x, coef_v, std, name)
        return SdeStepOutput(prev_sample.detach(), log_prob)


def _torch_step(model_output, sample, prediction, noise, prev_sample, validate, schedule) -> SdeStepOutput:
    if prediction == "flow" and schedule["form"] == "flow_grpo" and schedule["sigma_max"] is None:
        _require_no_sigma_one(schedule["sigma"], sample)
        schedule = dict(schedule, sigma_max=0.0)  # unused: no sample is at sigma == 1
    mean, std = reference.step_mean_std(model_output, sample, prediction, **schedule)
    if validate:
        require_positive_std(std)
    next_sample, log_prob = reference.sde_step(mean, std, sample.dtype, noise=noise, prev_sample=prev_sample)
    return SdeStepOutput(next_sample, log_prob)


def _require_no_sigma_one(sigma, sample: Tensor) -> None:
    s = per_sample(sigma, "sigma", sample.shape[0], compute_dtype(sample), sample.device)
    require(s != 1, ValueError, "flow_grpo step at sigma == 1 divides by 1 - sigma; pass sigma_max "
                                "(the schedule's second sigma, e.g. flow_sigmas(...)[1])")


def _coefficients(sample, prediction, sigma, sigma_next, eta, form, sigma_max, abar_t, abar_prev):
    batch, dtype, device = sample.shape[0], compute_dtype(sample), sample.device

    def value(v, name):
        return per_sample(v, name, batch, dtype, device)

    if prediction == "ddim":
        return ddim_coefficients(value(abar_t, "abar_t"), value(abar_prev, "abar_prev"), value(eta, "eta"))
    smax = None
    if form == "flow_grpo":
        if sigma_max is None:
            _require_no_sigma_one(sigma, sample)
        else:
            if not isinstance(sigma_max, Tensor) and not 0.0 <= float(sigma_max) < 1.0:
                raise ValueError(f"sigma_max must be in [0, 1), got {sigma_max}")
            smax = value(sigma_max, "sigma_max")
    return flow_coefficients(value(sigma, "sigma"), value(sigma_next, "sigma_next"), value(eta, "eta"), form, smax)


def sampler_step(sampler, model_output: Tensor, sample: Tensor, step: Tensor, *, noise: Tensor | None = None,
                 prev_sample: Tensor | None = None, eta: float | None = None, backend: str | None = None,
                 validate: bool = True) -> SdeStepOutput:
    """`fused_sde_step` with the schedule of a dancegrpo.sampler FlowSampler or DDIMSampler.

    ``step`` is the (B,) LongTensor of step indices, as for ``sampler.mean_std``.
    """
    eta = sampler.eta if eta is None else eta
    if sampler.prediction == "flow":
        schedule = dict(sigma=sampler.sigmas[step], sigma_next=sampler.sigmas[step + 1], form=sampler.form,
                        sigma_max=sampler.sigmas[1] if sampler.form == "flow_grpo" else None)
    else:
        schedule = dict(abar_t=sampler.abar_t[step], abar_prev=sampler.abar_prev[step])
    return fused_sde_step(model_output, sample, prediction=sampler.prediction, eta=eta, noise=noise,
                          prev_sample=prev_sample, backend=backend, validate=validate, **schedule)
