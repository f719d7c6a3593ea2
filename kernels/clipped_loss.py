"""Triton kernels of the fused clipped-ratio loss.

Stage 1, one program per BLOCK elements: ratio, loss term and gradient per element, and the
block's partial loss sum, ratio sum/min/max and clip count. Stage 2, one program: the
partials in a fixed order into [loss, ratio_mean, ratio_min, ratio_max, clip_fraction].
The gradient follows torch's conventions: maximum splits ties evenly, clamp passes its bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
FINAL_BLOCK = 256


@triton.jit
def _clipped_loss_kernel(new_ptr, old_ptr, adv_ptr, ratio_ptr, grad_ptr, partial_ptr, params_ptr, n,
                         HAS_ADV_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    # params (compute dtype): [1 - clip_range, 1 + clip_range, clip_range, adv_clip_max, 1 / n]
    lo = tl.load(params_ptr + 0)
    hi = tl.load(params_ptr + 1)
    clip_range = tl.load(params_ptr + 2)
    adv_clip_max = tl.load(params_ptr + 3)
    inv_n = tl.load(params_ptr + 4)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    new = tl.load(new_ptr + offsets, mask=mask, other=0.0)
    old = tl.load(old_ptr + offsets, mask=mask, other=0.0)
    adv = tl.load(adv_ptr + offsets, mask=mask, other=0.0)
    ratio = tl.exp(new - old)
    if HAS_ADV_CLIP:
        adv = tl.minimum(tl.maximum(adv, -adv_clip_max), adv_clip_max)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    d_clipped = tl.where((ratio >= lo) & (ratio <= hi), -adv, 0.0)
    d_ratio = tl.where(unclipped > clipped, -adv, tl.where(unclipped < clipped, d_clipped, 0.5 * (d_clipped - adv)))
    tl.store(ratio_ptr + offsets, ratio, mask=mask)
    tl.store(grad_ptr + offsets, d_ratio * ratio * inv_n, mask=mask)
    loss = tl.where(mask, tl.maximum(unclipped, clipped), 0.0)
    is_clipped = tl.where(mask & (tl.abs(ratio - 1.0) > clip_range), 1.0, 0.0)
    base = partial_ptr + block * 5
    tl.store(base + 0, tl.sum(loss, axis=0))
    tl.store(base + 1, tl.sum(tl.where(mask, ratio, 0.0), axis=0))
    tl.store(base + 2, tl.min(tl.where(mask, ratio, float("inf")), axis=0))
    tl.store(base + 3, tl.max(tl.where(mask, ratio, float("-inf")), axis=0))
    tl.store(base + 4, tl.sum(is_clipped, axis=0))


@triton.jit
def _finalize_kernel(partial_ptr, stats_ptr, num_blocks, n, BLOCK: tl.constexpr):
    loss = tl.zeros((BLOCK,), dtype=tl.float64)
    ratio_sum = tl.zeros((BLOCK,), dtype=tl.float64)
    clipped = tl.zeros((BLOCK,), dtype=tl.float64)
    ratio_min = tl.full((BLOCK,), float("inf"), dtype=tl.float64)
    ratio_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float64)
    for start in range(0, num_blocks, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < num_blocks
        row = partial_ptr + offsets * 5
        loss += tl.load(row + 0, mask=mask, other=0.0).to(tl.float64)
        ratio_sum += tl.load(row + 1, mask=mask, other=0.0).to(tl.float64)
        ratio_min = tl.minimum(ratio_min, tl.load(row + 2, mask=mask, other=float("inf")).to(tl.float64))
        ratio_max = tl.maximum(ratio_max, tl.load(row + 3, mask=mask, other=float("-inf")).to(tl.float64))
        clipped += tl.load(row + 4, mask=mask, other=0.0).to(tl.float64)
    out_type = stats_ptr.dtype.element_ty
    tl.store(stats_ptr + 0, (tl.sum(loss, axis=0) / n).to(out_type))
    tl.store(stats_ptr + 1, (tl.sum(ratio_sum, axis=0) / n).to(out_type))
    tl.store(stats_ptr + 2, tl.min(ratio_min, axis=0).to(out_type))
    tl.store(stats_ptr + 3, tl.max(ratio_max, axis=0).to(out_type))
    tl.store(stats_ptr + 4, (tl.sum(clipped, axis=0) / n).to(out_type))


def clipped_loss(new_logp, old_logp, advantages, clip_range: float, adv_clip_max: float | None,
                 block: int = BLOCK):
    """(loss, ratio, d loss / d new_logp, [ratio_mean, ratio_min, ratio_max, clip_fraction])."""
    dtype = torch.promote_types(torch.promote_types(new_logp.dtype, old_logp.dtype), torch.float32)
    new, old, adv = (t.to(dtype).contiguous() for t in (new_logp, old_logp, advantages))
    n = new.shape[0]
    blocks = max(1, triton.cdiv(n, block))
    ratio, grad = torch.empty_like(new), torch.empty_like(new)
    partial = torch.empty((blocks, 5), dtype=dtype, device=new.device)
    stats = torch.empty(5, dtype=dtype, device=new.device)
    # Bounds rounded to the compute dtype once, from double, as torch does for a clamp with
    # Python-float bounds (Triton would pass float arguments as float32).
    params = torch.tensor([1.0 - clip_range, 1.0 + clip_range, clip_range,
                           adv_clip_max if adv_clip_max is not None else 0.0, 1.0 / n], dtype=torch.float64)
    params = params.to(device=new.device, dtype=dtype)
    _clipped_loss_kernel[(blocks,)](new, old, adv, ratio, grad, partial, params, n,
                                    HAS_ADV_CLIP=adv_clip_max is not None, BLOCK=block)
    _finalize_kernel[(1,)](partial, stats, blocks, n, BLOCK=FINAL_BLOCK)
    return stats[0].clone(), ratio, grad, stats[1:].clone()
