"""`fused_sde_step`: one sampler step and its log-prob in one pass over the latents.

The hot path does no host work beyond reading tensor metadata: the step coefficients come
from a table built once (per sampler, or per distinct set of float schedule values) and
validated then; the backend is resolved once per device type; an eager call goes straight to
the backend's kernel (through a plain autograd.Function when a gradient is needed) and the
kernel writes the log-probs itself. Under torch.compile the same kernels run as the
torch.library custom ops of dancegrpo.ops.library, which the compiler traces.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..sde import FLOW_FORMS, ScheduleValue
from . import library, reference
from .backends import kernels_for, resolve_backend
from .schedule import (PREDICTIONS, SIGMA_ONE_MESSAGE, check_schedule_value, compute_dtype, per_sample,
                       step_table)
from .validation import check_latents, debug_checks, require, require_positive_std


class SdeStepOutput(NamedTuple):
    """``next_sample``: the action (sampled in rollout mode, the given prev_sample, detached, in
    training mode), in the latent dtype. ``log_prob``: (B,) mean Gaussian log-density of the
    action over its elements, float32 (float64 for float64 latents)."""

    next_sample: Tensor
    log_prob: Tensor


# Single-row coefficient tables of float-valued schedules, keyed by the values, the compute
# dtype and the device: [table, validated]. Bounded: cleared when it grows past the limit.
_float_tables: dict[tuple, list] = {}
_FLOAT_TABLE_LIMIT = 4096


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

    Float schedule values are turned into step coefficients (and validated) once per distinct
    set of values; tensor schedule values are converted on every call. In a sampling loop,
    prefer `sampler_step`, whose coefficients are precomputed per sampler.

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
        validate: check std > 0 (a deterministic step, e.g. eta = 0, has no log-prob: ValueError;
            on a GPU an asynchronous device assertion, no host sync).

    Returns:
        SdeStepOutput(next_sample, log_prob).
    """
    action, action_name = _action(noise, prev_sample)
    check_latents(model_output, sample, action, action_name)
    compiling = torch.compiler.is_compiling()
    name, kernels = (resolve_backend(backend, sample.device), None) if compiling else kernels_for(backend,
                                                                                                    sample.device)
    key = None
    if (kernels is not None and type(sigma) in _SCALARS and type(sigma_next) in _SCALARS and type(eta) in _SCALARS
            and type(sigma_max) in _SCALARS and type(abar_t) in _SCALARS and type(abar_prev) in _SCALARS):
        # float schedule values: their table is built and validated once, then looked up
        key = (prediction, form, sigma, sigma_next, eta, sigma_max, abar_t, abar_prev, sample.dtype == torch.float64,
               sample.device)
        entry = _float_tables.get(key)
        if entry is not None and (entry[2] or not validate):
            return _launch(name, kernels, model_output, sample, noise, prev_sample, entry[0], None)
    schedule = dict(sigma=sigma, sigma_next=sigma_next, eta=eta, form=form, sigma_max=sigma_max, abar_t=abar_t,
                    abar_prev=abar_prev)
    if name == "torch":
        _check_schedule(prediction, schedule, sample.shape[0])
        return _torch_step(model_output, sample, prediction, noise, prev_sample, validate, schedule)
    if key is not None:
        coefs = _float_table(key, prediction, schedule, sample, validate)
    else:
        _check_schedule(prediction, schedule, sample.shape[0])
        coefs, std = step_table(prediction, sample.shape[0], compute_dtype(sample), sample.device, **schedule)
        if validate:
            require_positive_std(std)
    return _launch(name, kernels, model_output, sample, noise, prev_sample, coefs, None)


def sampler_step(sampler, model_output: Tensor, sample: Tensor, step: Tensor, *, noise: Tensor | None = None,
                 prev_sample: Tensor | None = None, eta: float | None = None, backend: str | None = None,
                 validate: bool = True) -> SdeStepOutput:
    """`fused_sde_step` with the schedule of a dancegrpo.sampler FlowSampler or DDIMSampler.

    ``step`` is the (B,) int64 tensor of step indices on the latents' device, as for
    ``sampler.mean_std``. The coefficients of every step come from
    ``sampler.step_coefficients`` (built and validated once per sampler, dtype and device),
    and the kernel looks each sample's row up by its step: no per-call host work, no host
    sync, nothing allocated from host values, so the call can be captured in a CUDA graph.
    Step indices are checked against the sampler's steps by the CPU kernel, and on a GPU
    only under the debug checks (DANCEGRPO_OPS_CHECK=1, see ops.set_debug_checks).
    An ``eta`` other than the sampler's takes the per-call path of `fused_sde_step`.
    The torch backend computes the reference math (dancegrpo.sde) on the same schedule.
    """
    if eta is not None and eta != sampler.eta:
        return fused_sde_step(model_output, sample, prediction=sampler.prediction, eta=eta, noise=noise,
                              prev_sample=prev_sample, backend=backend, validate=validate,
                              **_sampler_schedule(sampler, step))
    action, action_name = _action(noise, prev_sample)
    check_latents(model_output, sample, action, action_name)
    compiling = torch.compiler.is_compiling()
    name, kernels = (resolve_backend(backend, sample.device), None) if compiling else kernels_for(backend,
                                                                                                    sample.device)
    if name == "torch":
        return fused_sde_step(model_output, sample, prediction=sampler.prediction, eta=sampler.eta, noise=noise,
                              prev_sample=prev_sample, backend="torch", validate=validate,
                              **_sampler_schedule(sampler, step))
    if not (isinstance(step, Tensor) and step.dtype == torch.long and step.shape == sample.shape[:1]
            and step.device == sample.device):
        raise ValueError(f"step must be an int64 tensor of shape ({sample.shape[0]},) on {sample.device}, got "
                         + (f"{step.dtype} {tuple(step.shape)} on {step.device}" if isinstance(step, Tensor)
                            else type(step).__name__))
    coefs = sampler.step_coefficients(torch.float64 if sample.dtype == torch.float64 else torch.float32,
                                      sample.device, validate=validate)
    if debug_checks() and not compiling:
        bad = (step < 0) | (step >= coefs.shape[0])
        if bool(bad.any()):
            raise ValueError(f"step indices {step[bad].tolist()} are outside the sampler's {coefs.shape[0]} steps")
    return _launch(name, kernels, model_output, sample, noise, prev_sample, coefs, step)


def _action(noise, prev_sample):
    if (noise is None) == (prev_sample is None):
        raise ValueError("pass exactly one of noise (rollout mode) or prev_sample (training mode)")
    return (noise, "noise") if noise is not None else (prev_sample, "prev_sample")


def _launch(name, kernels, model_output, sample, noise, prev_sample, coefs, index) -> SdeStepOutput:
    """One kernel call: the custom op when compiling (kernels is None), else the kernel itself."""
    if kernels is None:
        if noise is not None:
            next_sample, log_prob = library.sde_step_sample(model_output, sample, noise.detach(), coefs, index, name)
            return SdeStepOutput(next_sample.detach(), log_prob)
        log_prob = library.sde_step_log_prob(model_output, sample, prev_sample.detach(), coefs, index, name)
        return SdeStepOutput(prev_sample.detach(), log_prob)
    needs_grad = model_output.requires_grad and torch.is_grad_enabled()
    if noise is not None:
        if needs_grad:
            return SdeStepOutput(*library.EagerSample.apply(model_output, sample, noise.detach(), coefs, index,
                                                            kernels))
        return SdeStepOutput(*kernels.sde_step_sample(model_output, sample, noise, coefs, index))
    prev_sample = prev_sample.detach()
    if needs_grad:
        return SdeStepOutput(prev_sample, library.EagerLogProb.apply(model_output, sample, prev_sample, coefs, index,
                                                                     kernels))
    return SdeStepOutput(prev_sample, kernels.sde_step_log_prob(model_output, sample, prev_sample, coefs, index))


_SCALARS = (float, int, type(None))


def _float_table(key, prediction, schedule, sample, validate) -> Tensor:
    """Build (once) and validate (once) the single-row table of an all-float schedule."""
    entry = _float_tables.get(key)
    if entry is None:
        _check_schedule(prediction, schedule, sample.shape[0])
        table, std = step_table(prediction, 1, compute_dtype(sample), sample.device, **schedule)
        if len(_float_tables) >= _FLOAT_TABLE_LIMIT:
            _float_tables.clear()
        entry = _float_tables[key] = [table, std, False]
    if validate and not entry[2]:
        require_positive_std(entry[1])  # once per schedule
        entry[2] = True
    return entry[0]


def _check_schedule(prediction, schedule, batch) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if prediction == "flow" and schedule["form"] not in FLOW_FORMS:
        raise ValueError(f"unknown flow step form {schedule['form']!r}; choose one of {FLOW_FORMS}")
    for name in ("sigma", "sigma_next", "eta", "sigma_max", "abar_t", "abar_prev"):
        check_schedule_value(schedule[name], name, batch)


def _sampler_schedule(sampler, step) -> dict:
    if sampler.prediction == "flow":
        return dict(sigma=sampler.sigmas[step], sigma_next=sampler.sigmas[step + 1], form=sampler.form,
                    sigma_max=sampler.sigmas[1] if sampler.form == "flow_grpo" else None)
    return dict(abar_t=sampler.abar_t[step], abar_prev=sampler.abar_prev[step])


def _torch_step(model_output, sample, prediction, noise, prev_sample, validate, schedule) -> SdeStepOutput:
    if prediction == "flow" and schedule["form"] == "flow_grpo" and schedule["sigma_max"] is None:
        s = per_sample(schedule["sigma"], "sigma", sample.shape[0], compute_dtype(sample), sample.device)
        require(s != 1, ValueError, SIGMA_ONE_MESSAGE)
        schedule = dict(schedule, sigma_max=0.0)  # unused: no sample is at sigma == 1
    mean, std = reference.step_mean_std(model_output, sample, prediction, **schedule)
    if validate:
        require_positive_std(std)
    next_sample, log_prob = reference.sde_step(mean, std, sample.dtype, noise=noise, prev_sample=prev_sample)
    return SdeStepOutput(next_sample, log_prob)
