"""`fused_clipped_loss`: the GRPO clipped-ratio loss, its gradient and its statistics in one pass."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..grpo import ClippedLossOutput
from . import library, reference
from .backends import kernels_for, resolve_backend
from .validation import check_tensor


def fused_clipped_loss(new_logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_range: float,
                       adv_clip_max: float | None = None, *, backend: str | None = None) -> ClippedLossOutput:
    """grpo.clipped_ratio_loss, fused: same arguments, same result, same gradient.

    Per element ``max(-A*rho, -A*clip(rho, 1-clip_range, 1+clip_range))`` with
    ``rho = exp(new_logp - old_logp)`` and A clamped to ``+-adv_clip_max``, averaged. The kernel
    computes the loss, d loss / d new_logp (kept for backward), the ratios and their mean,
    min, max and the clip fraction in one pass; only ``new_logp`` gets a gradient.

    Args:
        new_logp, old_logp, advantages: (N,) float tensors on one device, N >= 1.
        clip_range: > 0. adv_clip_max: > 0, or None for no advantage clipping.
        backend: as for fused_sde_step.
    """
    for t, name in ((new_logp, "new_logp"), (old_logp, "old_logp"), (advantages, "advantages")):
        check_tensor(t, name)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
        if t.device != new_logp.device:
            raise ValueError(f"{name} is on {t.device} but new_logp is on {new_logp.device}")
    if old_logp.shape != new_logp.shape or advantages.shape != new_logp.shape:
        raise ValueError(f"new_logp {tuple(new_logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have the same shape (N,); expand each sample's "
                         "advantage to its trained steps first")
    if new_logp.shape[0] == 0:
        raise ValueError("the clipped loss needs at least one element, got N = 0 (skip empty micro-batches)")
    if not (isinstance(clip_range, (int, float)) and clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(f"clip_range must be a finite float > 0, got {clip_range!r}")
    if adv_clip_max is not None and not (isinstance(adv_clip_max, (int, float)) and adv_clip_max > 0):
        raise ValueError(f"adv_clip_max must be a float > 0 or None, got {adv_clip_max!r}")

    if torch.compiler.is_compiling():
        name = resolve_backend(backend, new_logp.device)
        if name == "torch":
            return reference.clipped_loss(new_logp, old_logp, advantages, clip_range, adv_clip_max)
        loss, ratio, _grad, stats = library.clipped_loss(
            new_logp, old_logp.detach(), advantages.detach(), float(clip_range),
            None if adv_clip_max is None else float(adv_clip_max), name)
        stats = stats.detach()
    else:
        name, kernels = kernels_for(backend, new_logp.device)
        if name == "torch":
            return reference.clipped_loss(new_logp, old_logp, advantages, clip_range, adv_clip_max)
        args = (new_logp, old_logp.detach(), advantages.detach(), float(clip_range),
                None if adv_clip_max is None else float(adv_clip_max))
        if new_logp.requires_grad and torch.is_grad_enabled():
            loss, ratio, _grad, stats = library.EagerClippedLoss.apply(*args, kernels)
        else:
            loss, ratio, _grad, stats = kernels.clipped_loss(*args)
    return ClippedLossOutput(loss=loss, ratio=ratio.detach(), clip_fraction=stats[3], ratio_mean=stats[0],
                             ratio_min=stats[1], ratio_max=stats[2])
