"""Triton kernels of the fused SDE step: mean = coef_x*x + coef_v*v, next = mean + std*noise.

Grid (blocks per sample, B): each program handles BLOCK elements of one sample and writes
the partial sum of (action - mean)^2; the partials are added per sample in a fixed order, so
results are deterministic. Rollout and training run the same kernel (MODE is a compile-time
switch that only changes where the action comes from), so both modes produce the same
partial sums for the same action: bit-identical log-probs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
_SAMPLE, _SCORE = 0, 1


@triton.jit
def _load(ptrs, mask, IS_BF16: tl.constexpr, compute: tl.constexpr):
    """Load and widen to the compute dtype. bfloat16 arrives as raw int16 bits and is widened
    by a shift: exact, as the GPU conversion is, and also under the Triton interpreter, whose
    bfloat16 conversions truncate and mishandle subnormals."""
    if IS_BF16:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True).to(compute)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(compute)


@triton.jit
def _store(ptrs, value, mask, IS_BF16: tl.constexpr):
    """Round to the storage dtype (to nearest even), store, and return the stored value widened
    back; bfloat16 is rounded by hand on its bits (see _load)."""
    if IS_BF16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptrs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        return (bits << 16).to(tl.float32, bitcast=True).to(value.dtype)
    else:
        stored = value.to(ptrs.dtype.element_ty)
        tl.store(ptrs, stored, mask=mask)
        return stored.to(value.dtype)


@triton.jit
def _sde_step_kernel(v_ptr, x_ptr, action_ptr, next_ptr, coef_x_ptr, coef_v_ptr, std_ptr, partial_ptr,
                     numel, blocks_per_sample, MODE: tl.constexpr, V_BF16: tl.constexpr, X_BF16: tl.constexpr,
                     BLOCK: tl.constexpr):
    block = tl.program_id(0)
    b = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    base = b.to(tl.int64) * numel
    coef_x = tl.load(coef_x_ptr + b)
    coef_v = tl.load(coef_v_ptr + b)
    compute: tl.constexpr = coef_x_ptr.dtype.element_ty  # float32, or float64 for float64 latents
    x = _load(x_ptr + base + offsets, mask, X_BF16, compute)
    v = _load(v_ptr + base + offsets, mask, V_BF16, compute)
    mean = coef_x * x + coef_v * v
    if MODE == 0:
        noise = _load(action_ptr + base + offsets, mask, X_BF16, compute)
        std = tl.load(std_ptr + b)
        # Score the action as stored (rounded to the latent dtype), as training will see it.
        action = _store(next_ptr + base + offsets, mean + std * noise, mask, X_BF16)
    else:
        action = _load(action_ptr + base + offsets, mask, X_BF16, compute)
    diff = tl.where(mask, action - mean, 0.0)
    tl.store(partial_ptr + b * blocks_per_sample + block, tl.sum(diff * diff, axis=0))


@triton.jit
def _sde_step_backward_kernel(v_ptr, x_ptr, prev_ptr, grad_ptr, coef_x_ptr, coef_v_ptr, scale_ptr, numel,
                              V_BF16: tl.constexpr, X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    b = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    base = b.to(tl.int64) * numel
    coef_x = tl.load(coef_x_ptr + b)
    coef_v = tl.load(coef_v_ptr + b)
    scale = tl.load(scale_ptr + b)
    compute: tl.constexpr = coef_x_ptr.dtype.element_ty
    x = _load(x_ptr + base + offsets, mask, X_BF16, compute)
    v = _load(v_ptr + base + offsets, mask, V_BF16, compute)
    prev = _load(prev_ptr + base + offsets, mask, X_BF16, compute)
    _store(grad_ptr + base + offsets, scale * (prev - (coef_x * x + coef_v * v)), mask, V_BF16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 tensors go to the kernels as their int16 bits (see _load)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(t.shape[0], -1)


def _run(mode: int, model_output, sample, action, coef_x, coef_v, std, block: int):
    batch = sample.shape[0]
    v, x, a = _flat(model_output), _flat(sample), _flat(action)
    numel = x.shape[1]
    blocks = max(1, triton.cdiv(numel, block))
    partial = torch.empty((batch, blocks), dtype=coef_x.dtype, device=sample.device)
    next_sample = torch.empty_like(x) if mode == _SAMPLE else x  # x: unused placeholder when scoring
    if batch > 0:
        _sde_step_kernel[(blocks, batch)](_bits(v), _bits(x), _bits(a), _bits(next_sample), coef_x.contiguous(),
                                          coef_v.contiguous(), std.contiguous(), partial, numel, blocks, MODE=mode,
                                          V_BF16=v.dtype == torch.bfloat16, X_BF16=x.dtype == torch.bfloat16,
                                          BLOCK=block)
    sumsq = partial.to(torch.float64).sum(dim=1)
    s = std.to(torch.float64)
    log_prob = (-(sumsq / numel) / (2 * s * s) - torch.log(s) - _HALF_LOG_TWO_PI).to(coef_x.dtype)
    return next_sample.reshape(sample.shape), log_prob


def sde_step_sample(model_output, sample, noise, coef_x, coef_v, std, block: int = BLOCK):
    """Rollout: (next_sample, log_prob (B,))."""
    return _run(_SAMPLE, model_output, sample, noise, coef_x, coef_v, std, block)


def sde_step_log_prob(model_output, sample, prev_sample, coef_x, coef_v, std, block: int = BLOCK):
    """Training: log_prob (B,) of prev_sample."""
    return _run(_SCORE, model_output, sample, prev_sample, coef_x, coef_v, std, block)[1]


def sde_step_backward(grad_log_prob, model_output, sample, prev_sample, coef_x, coef_v, std, block: int = BLOCK):
    """Gradient of sum_b grad_log_prob[b] * log_prob[b] w.r.t. model_output."""
    batch = sample.shape[0]
    v, x, p = _flat(model_output), _flat(sample), _flat(prev_sample)
    numel = x.shape[1]
    s = std.to(torch.float64)
    scale = (grad_log_prob.to(torch.float64) * coef_v.to(torch.float64) / (s * s * numel)).to(coef_x.dtype)
    grad = torch.empty_like(v)
    if batch > 0 and numel > 0:
        _sde_step_backward_kernel[(triton.cdiv(numel, block), batch)](
            _bits(v), _bits(x), _bits(p), _bits(grad), coef_x.contiguous(), coef_v.contiguous(), scale, numel,
            V_BF16=v.dtype == torch.bfloat16, X_BF16=x.dtype == torch.bfloat16, BLOCK=block)
    return grad.reshape(model_output.shape)
