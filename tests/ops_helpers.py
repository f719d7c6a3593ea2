"""Shared helpers of the fused-op tests: backends to test, reference values in float64."""
from __future__ import annotations

import os

import torch

from dancegrpo import ops, sde


def cpu_kernel_backends() -> list[str]:
    """Compiled CPU backends under test; the C++ extension is built just in time if needed."""
    ops.build_cpu_extension()
    return ["cpp"]


def flow_case(batch: int, form: str, std_scale: str, gen: torch.Generator) -> dict:
    """Per-sample schedule values of a flow step; std_scale picks tiny, normal or large std."""
    sigmas = sde.flow_sigmas(16, shift=3.0)
    steps = torch.randint(0, 15, (batch,), generator=gen)
    if form == "flow_grpo":
        steps[0] = 0  # sigma == 1: exercises the sigma_max substitution
    eta = {"small": 1e-3, "normal": 0.7, "large": 25.0}[std_scale]
    return dict(prediction="flow", sigma=sigmas[steps], sigma_next=sigmas[steps + 1], eta=eta, form=form,
                sigma_max=sigmas[1] if form == "flow_grpo" else None)


def ddim_case(batch: int, std_scale: str, gen: torch.Generator) -> dict:
    alphas = sde.ddim_alphas_cumprod()
    timesteps = sde.ddim_timesteps(50)
    abar_t, abar_prev = sde.ddim_schedule(50, alphas, timesteps)
    steps = torch.randint(0, 49, (batch,), generator=gen)
    eta = {"small": 1e-3, "normal": 1.0, "large": 1.0}[std_scale]
    if std_scale == "large":  # the earliest steps have std close to 1
        steps = torch.zeros(batch, dtype=torch.long)
    return dict(prediction="ddim", abar_t=abar_t[steps], abar_prev=abar_prev[steps], eta=eta)


def schedule_kwargs(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "prediction"}


EPS32 = 2.0**-24  # float32 unit roundoff


class ErrorModel:
    """First-order float32 error of one step, per element, in float64.

    The mean a*x + b*v rounds with an error of a few EPS32 times |a*x| + |b*v| (whatever order
    the terms are added in), and the per-sample coefficients a, b, std carry their own
    rounding, measured as their float32-minus-float64 difference (a wrong formula changes
    the float64 value too, so it is caught by the comparison with the reference, not hidden
    here). diff_err bounds the error of (action - mean); std_rel the relative error of std.
    """

    def __init__(self, model_output, sample, action, case: dict):
        coefs = {dt: _coefficients(sample, case, dt) for dt in (torch.float32, torch.float64)}
        shape = (sample.shape[0],) + (1,) * (sample.dim() - 1)
        (a32, b32, s32), (a, b, s) = ([c.double().reshape(shape) for c in coefs[dt]] for dt in coefs)
        x, v, p = sample.double(), model_output.double(), action.double()
        self.coef_v, self.std = b, s
        self.numel = sample[0].numel()
        terms = (a * x).abs() + (b * v).abs() + p.abs()
        self.diff_err = 8 * EPS32 * terms + 2 * ((a32 - a).abs() * x.abs() + (b32 - b).abs() * v.abs())
        self.coef_v_rel = 2 * (b32 - b).abs() / b.abs() + 8 * EPS32
        self.std_rel = 2 * (s32 - s).abs() / s + 8 * EPS32
        self.terms = terms

    def action_bound(self, noise):
        """Error of a stored float32 action mean + std*noise."""
        return self.diff_err + 8 * EPS32 * (self.std * noise.double()).abs() + self.std_rel * (self.std * noise.double()).abs()

    def log_prob_bound(self, diff, truth):
        """Error of -mean(diff^2)/(2 std^2) - log(std) - c for diff = action - mean (float64)."""
        b = diff.shape[0]
        d = diff.abs().reshape(b, -1)
        s, rel = self.std.reshape(b), self.std_rel.reshape(b)
        from_diff = (d * self.diff_err.reshape(b, -1)).mean(dim=1) / s**2
        from_std = ((d**2).mean(dim=1) / s**2 + 1) * rel
        return from_diff + from_std + 8 * EPS32 * (truth.abs() + 1)

    def grad_bound(self, weights, truth):
        """Error of w * b * diff / (std^2 n) for each element."""
        w = weights.double().reshape(self.coef_v.shape)
        scale = (w * self.coef_v).abs() / (self.std**2 * self.numel)
        return scale * self.diff_err + truth.abs() * (self.coef_v_rel + 2 * self.std_rel + 8 * EPS32)


def _coefficients(sample, case: dict, dtype):
    from dancegrpo.ops import schedule

    b = sample.shape[0]
    kw = schedule_kwargs(case)
    val = lambda name: schedule.per_sample(kw[name], name, b, dtype, sample.device)  # noqa: E731
    if case["prediction"] == "flow":
        smax = val("sigma_max") if kw.get("sigma_max") is not None else None
        return schedule.flow_coefficients(val("sigma"), val("sigma_next"), val("eta"), kw["form"], smax)
    return schedule.ddim_coefficients(val("abar_t"), val("abar_prev"), val("eta"))


def _reference_mean_std(model_output, sample, case: dict, dtype):
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in schedule_kwargs(case).items()}
    if case["prediction"] == "flow":
        return sde.flow_step_mean_std(model_output.to(dtype), sample.to(dtype), kw["sigma"], kw["sigma_next"],
                                      kw["eta"], form=kw["form"], sigma_max=kw["sigma_max"])
    return sde.ddim_step_mean_std(model_output.to(dtype), sample.to(dtype), kw["abar_t"], kw["abar_prev"], kw["eta"])


def reference_log_prob(model_output, sample, prev_sample, case: dict, dtype=torch.float64):
    """The torch reference (dancegrpo.sde) evaluated in `dtype` on the given values."""
    mean, std = _reference_mean_std(model_output, sample, case, dtype)
    return sde.gaussian_log_prob(prev_sample.to(dtype), mean, std)


def triton_interpreted() -> bool:
    """True in the subprocess of tests/test_ops_triton.py, which sets TRITON_INTERPRET=1 before
    anything imports triton (set later, Triton's own jit'd library functions such as tl.sum
    would already target a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends_under_test() -> list[str]:
    """torch and cpp always; triton only in the interpreter subprocess (test_ops_triton.py)."""
    return ["torch", *cpu_kernel_backends(), *(["triton"] if triton_interpreted() else [])]
