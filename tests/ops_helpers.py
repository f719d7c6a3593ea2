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


def reference_log_prob(model_output, sample, prev_sample, case: dict, dtype=torch.float64):
    """The torch reference (dancegrpo.sde) evaluated in `dtype` on the given values."""
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in schedule_kwargs(case).items()}
    if case["prediction"] == "flow":
        mean, std = sde.flow_step_mean_std(model_output.to(dtype), sample.to(dtype), kw["sigma"], kw["sigma_next"],
                                           kw["eta"], form=kw["form"], sigma_max=kw["sigma_max"])
    else:
        mean, std = sde.ddim_step_mean_std(model_output.to(dtype), sample.to(dtype), kw["abar_t"], kw["abar_prev"],
                                           kw["eta"])
    return sde.gaussian_log_prob(prev_sample.to(dtype), mean, std)


def triton_interpreted() -> bool:
    """True in the subprocess of tests/test_ops_triton.py, which sets TRITON_INTERPRET=1 before
    anything imports triton (set later, Triton's own jit'd library functions such as tl.sum
    would already target a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends_under_test() -> list[str]:
    """torch and cpp always; triton only in the interpreter subprocess (test_ops_triton.py)."""
    return ["torch", *cpu_kernel_backends(), *(["triton"] if triton_interpreted() else [])]
