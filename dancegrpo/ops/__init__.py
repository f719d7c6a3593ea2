"""Fused ops of DanceGRPO, one dispatcher per op.

    from dancegrpo import ops
    next_x, logp = ops.fused_sde_step(v, x, prediction="flow", sigma=s, sigma_next=s_next, eta=0.3, noise=n)
    _, logp = ops.fused_sde_step(v, x, prediction="flow", sigma=s, sigma_next=s_next, eta=0.3, prev_sample=x_next)
    out = ops.fused_clipped_loss(logp, old_logp, adv, clip_range=1e-4, adv_clip_max=5.0)

Each op is defined by its plain torch reference (ops.reference, i.e. dancegrpo.sde and
dancegrpo.grpo) and has kernels in C++ for the CPU (csrc/cpu), Triton (kernels/) and CUDA
(csrc/cuda), registered as torch.library custom ops so torch.compile traces through them;
eager calls go straight to the kernels. The backend is resolved once per device type (see
dancegrpo.ops.backends); without any built extension everything runs on the torch reference.
A call does no host work beyond metadata checks: step coefficients come from tables built
and validated once (`sampler.step_coefficients`, or one per distinct float schedule), and
each kernel writes its log-probs itself (one launch). DANCEGRPO_OPS_CHECK=1 (or
`set_debug_checks(True)`) adds per-call checks that read tensor values.
"""
from __future__ import annotations

from ..grpo import ClippedLossOutput
from .backends import BACKENDS, ENV_VAR, available_backends, resolve_backend, set_default_backend
from .clipped_loss import fused_clipped_loss
from .extension import build_cpu_extension, load_extension
from .sde_step import SdeStepOutput, fused_sde_step, sampler_step
from .validation import set_debug_checks

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ClippedLossOutput",
    "SdeStepOutput",
    "available_backends",
    "build_cpu_extension",
    "fused_clipped_loss",
    "fused_sde_step",
    "load_extension",
    "resolve_backend",
    "sampler_step",
    "set_debug_checks",
    "set_default_backend",
]
