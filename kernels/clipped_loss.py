"""Triton kernels of the fused clipped-ratio loss.

One launch, one program per BLOCK elements: ratio, loss term and gradient per element, and
the block's partial loss sum, ratio sum/min/max and clip count; the last program to finish
(an atomic counter) combines the partials in a fixed order into the loss and [ratio_mean,
ratio_min, ratio_max, clip_fraction].
The gradient follows torch's conventions: maximum splits ties evenly, clamp passes its bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
FINAL_BLOCK = 256


@triton.jit
def _clipped_loss_kernel(new_ptr, old_ptr, adv_ptr, ratio_ptr, grad_ptr, partial_ptr, count_ptr, params_ptr,
                         loss_ptr, stats_ptr, n, num_blocks, HAS_ADV_CLIP: tl.constexpr, BLOCK: tl.constexpr,
                         FINAL_BLOCK: tl.constexpr):
    block = tl.program_id(0)
    # params (compute dtype): [1 - clip_range, 1 + clip_range, clip_range, adv_clip_max]
    lo = tl.load(params_ptr + 0)
    hi = tl.load(params_ptr + 1)
    clip_range = tl.load(params_ptr + 2)
    adv_clip_max = tl.load(params_ptr + 3)
    out_type = params_ptr.dtype.element_ty
    count = tl.full([], n, tl.float64)  # (n may arrive as a constexpr: Triton specialises 1)
    inv_n = (1.0 / count).to(out_type)  # 1 / n in double, rounded once
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
    tl.store(base + 0, tl.sum(loss, axis=0).to(tl.float64))
    tl.store(base + 1, tl.sum(tl.where(mask, ratio, 0.0), axis=0).to(tl.float64))
    tl.store(base + 2, tl.min(tl.where(mask, ratio, float("inf")), axis=0).to(tl.float64))
    tl.store(base + 3, tl.max(tl.where(mask, ratio, float("-inf")), axis=0).to(tl.float64))
    tl.store(base + 4, tl.sum(is_clipped, axis=0).to(tl.float64))
    # The last program to finish combines the partials in a fixed order (see sde_step.py).
    done = tl.atomic_add(count_ptr, 1)
    if done == num_blocks - 1:
        loss_acc = tl.zeros((FINAL_BLOCK,), dtype=tl.float64)
        ratio_sum = tl.zeros((FINAL_BLOCK,), dtype=tl.float64)
        clipped_acc = tl.zeros((FINAL_BLOCK,), dtype=tl.float64)
        ratio_min = tl.full((FINAL_BLOCK,), float("inf"), dtype=tl.float64)
        ratio_max = tl.full((FINAL_BLOCK,), float("-inf"), dtype=tl.float64)
        for start in range(0, num_blocks, FINAL_BLOCK):
            idx = start + tl.arange(0, FINAL_BLOCK)
            in_range = idx < num_blocks
            row = partial_ptr + idx * 5
            loss_acc += tl.load(row + 0, mask=in_range, other=0.0, cache_modifier=".cg")
            ratio_sum += tl.load(row + 1, mask=in_range, other=0.0, cache_modifier=".cg")
            ratio_min = tl.minimum(ratio_min, tl.load(row + 2, mask=in_range, other=float("inf"), cache_modifier=".cg"))
            ratio_max = tl.maximum(ratio_max, tl.load(row + 3, mask=in_range, other=float("-inf"),
                                                      cache_modifier=".cg"))
            clipped_acc += tl.load(row + 4, mask=in_range, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, (tl.sum(loss_acc, axis=0) / count).to(out_type))
        tl.store(stats_ptr + 0, (tl.sum(ratio_sum, axis=0) / count).to(out_type))
        tl.store(stats_ptr + 1, tl.min(ratio_min, axis=0).to(out_type))
        tl.store(stats_ptr + 2, tl.max(ratio_max, axis=0).to(out_type))
        tl.store(stats_ptr + 3, (tl.sum(clipped_acc, axis=0) / count).to(out_type))


# (clip_range, adv_clip_max, dtype, device) -> params tensor, built once per distinct setting:
# creating it per call would copy from the host on every call (not capturable in a CUDA graph).
_params: dict[tuple, torch.Tensor] = {}


def _params_for(clip_range: float, adv_clip_max: float | None, dtype, device) -> torch.Tensor:
    key = (clip_range, adv_clip_max, dtype, device)
    params = _params.get(key)
    if params is None:
        # Bounds rounded to the compute dtype once, from double, as torch does for a clamp with
        # Python-float bounds (Triton would pass float arguments as float32).
        params = torch.tensor([1.0 - clip_range, 1.0 + clip_range, clip_range,
                               adv_clip_max if adv_clip_max is not None else 0.0], dtype=torch.float64)
        if len(_params) > 256:
            _params.clear()
        params = _params[key] = params.to(device=device, dtype=dtype)
    return params


def clipped_loss(new_logp, old_logp, advantages, clip_range: float, adv_clip_max: float | None,
                 block: int = BLOCK):
    """(loss, ratio, d loss / d new_logp, [ratio_mean, ratio_min, ratio_max, clip_fraction])."""
    dtype = torch.promote_types(torch.promote_types(new_logp.dtype, old_logp.dtype), torch.float32)
    new, old, adv = (t.to(dtype).contiguous() for t in (new_logp, old_logp, advantages))
    n = new.shape[0]
    blocks = max(1, triton.cdiv(n, block))
    ratio, grad = torch.empty_like(new), torch.empty_like(new)
    partial = torch.empty((blocks, 5), dtype=torch.float64, device=new.device)
    count = torch.zeros(1, dtype=torch.int32, device=new.device)
    loss, stats = torch.empty((), dtype=dtype, device=new.device), torch.empty(4, dtype=dtype, device=new.device)
    params = _params_for(float(clip_range), adv_clip_max, dtype, new.device)
    _clipped_loss_kernel[(blocks,)](new, old, adv, ratio, grad, partial, count, params, loss, stats, n, blocks,
                                    HAS_ADV_CLIP=adv_clip_max is not None, BLOCK=block, FINAL_BLOCK=FINAL_BLOCK)
    return loss, ratio, grad, stats
