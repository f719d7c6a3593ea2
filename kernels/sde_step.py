"""Triton kernels of the fused SDE step: mean = coef_x*x + coef_v*v, next = mean + std*noise.

Grid (blocks per sample, B), so the grid fills the GPU whatever the batch: each program
handles BLOCK elements of one sample and writes the partial sum of (action - mean)^2; the
last program of a sample to finish adds that sample's partials in a fixed order and writes
its log-prob, so one launch does everything and results are deterministic. The step
coefficients come from a (rows, 4) float64 table (coef_x, coef_v, std, log std) and an
optional per-sample row index (see dancegrpo.ops.schedule). Rollout and training run the same kernel (MODE is a compile-time
switch that only changes where the action comes from), so both modes produce the same
partial sums for the same action: bit-identical log-probs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
FINAL_BLOCK = 128
HALF_LOG_TWO_PI: tl.constexpr = tl.constexpr(0.5 * math.log(2.0 * math.pi))
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
def _coef(coefs_ptr, index_ptr, b, rows, k: tl.constexpr, HAS_INDEX: tl.constexpr):
    """Column k of sample b's row of the (rows, 4) float64 table (see dancegrpo.ops.schedule)."""
    if HAS_INDEX:
        row = tl.load(index_ptr + b)
    else:
        row = tl.where(rows == 1, 0, b)
    return tl.load(coefs_ptr + row * 4 + k)


@triton.jit
def _sde_step_kernel(v_ptr, x_ptr, action_ptr, next_ptr, coefs_ptr, index_ptr, partial_ptr, count_ptr, logp_ptr,
                     numel, blocks_per_sample, rows, MODE: tl.constexpr, V_BF16: tl.constexpr, X_BF16: tl.constexpr,
                     F64: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr, FINAL_BLOCK: tl.constexpr):
    block = tl.program_id(0)
    b = tl.program_id(1)
    compute: tl.constexpr = tl.float64 if F64 else tl.float32
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    base = b.to(tl.int64) * numel
    coef_x = _coef(coefs_ptr, index_ptr, b, rows, 0, HAS_INDEX).to(compute)
    coef_v = _coef(coefs_ptr, index_ptr, b, rows, 1, HAS_INDEX).to(compute)
    x = _load(x_ptr + base + offsets, mask, X_BF16, compute)
    v = _load(v_ptr + base + offsets, mask, V_BF16, compute)
    mean = coef_x * x + coef_v * v
    if MODE == 0:
        noise = _load(action_ptr + base + offsets, mask, X_BF16, compute)
        std = _coef(coefs_ptr, index_ptr, b, rows, 2, HAS_INDEX).to(compute)
        # Score the action as stored (rounded to the latent dtype), as training will see it.
        action = _store(next_ptr + base + offsets, mean + std * noise, mask, X_BF16)
    else:
        action = _load(action_ptr + base + offsets, mask, X_BF16, compute)
    diff = tl.where(mask, action - mean, 0.0)
    tl.store(partial_ptr + b * blocks_per_sample + block, tl.sum(diff * diff, axis=0).to(tl.float64))
    # The last program of sample b to finish (acq_rel atomic: the others' partials are visible
    # to it) adds the partials in a fixed order and writes the log-prob: one launch, and the
    # result does not depend on the order the programs ran in.
    done = tl.atomic_add(count_ptr + b, 1)
    if done == blocks_per_sample - 1:
        acc = tl.zeros((FINAL_BLOCK,), dtype=tl.float64)
        for start in range(0, blocks_per_sample, FINAL_BLOCK):
            idx = start + tl.arange(0, FINAL_BLOCK)
            acc += tl.load(partial_ptr + b * blocks_per_sample + idx, mask=idx < blocks_per_sample, other=0.0,
                           cache_modifier=".cg")
        sumsq = tl.sum(acc, axis=0)
        s = _coef(coefs_ptr, index_ptr, b, rows, 2, HAS_INDEX)
        log_std = _coef(coefs_ptr, index_ptr, b, rows, 3, HAS_INDEX)
        # the constant as an exact float64 (a bare Python float would enter as a float32)
        log_prob = -(sumsq / numel) / (2.0 * s * s) - log_std - tl.full([], HALF_LOG_TWO_PI, tl.float64)
        tl.store(logp_ptr + b, log_prob.to(compute))


@triton.jit
def _sde_step_backward_kernel(v_ptr, x_ptr, prev_ptr, grad_ptr, coefs_ptr, index_ptr, glogp_ptr, numel, rows,
                              V_BF16: tl.constexpr, X_BF16: tl.constexpr, F64: tl.constexpr, HAS_INDEX: tl.constexpr,
                              BLOCK: tl.constexpr):
    block = tl.program_id(0)
    b = tl.program_id(1)
    compute: tl.constexpr = tl.float64 if F64 else tl.float32
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    base = b.to(tl.int64) * numel
    coef_x = _coef(coefs_ptr, index_ptr, b, rows, 0, HAS_INDEX)
    coef_v = _coef(coefs_ptr, index_ptr, b, rows, 1, HAS_INDEX)
    s = _coef(coefs_ptr, index_ptr, b, rows, 2, HAS_INDEX)
    # d logp_b / d v = coef_v_b * (prev - mean) / (std_b^2 numel), the factor in float64
    scale = (tl.load(glogp_ptr + b).to(tl.float64) * coef_v / (s * s * numel)).to(compute)
    coef_x = coef_x.to(compute)
    coef_v = coef_v.to(compute)
    x = _load(x_ptr + base + offsets, mask, X_BF16, compute)
    v = _load(v_ptr + base + offsets, mask, V_BF16, compute)
    prev = _load(prev_ptr + base + offsets, mask, X_BF16, compute)
    _store(grad_ptr + base + offsets, scale * (prev - (coef_x * x + coef_v * v)), mask, V_BF16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 tensors go to the kernels as their int16 bits (see _load)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(t.shape[0], -1)


def _table_args(coefs: torch.Tensor, index):
    """(coefs, index pointer argument, rows, HAS_INDEX); the coefs pointer stands in for a missing index."""
    coefs = coefs.contiguous()
    return coefs, (coefs if index is None else index.contiguous()), coefs.shape[0], index is not None


def _run(mode: int, model_output, sample, action, coefs, index, block: int):
    batch = sample.shape[0]
    v, x, a = _flat(model_output), _flat(sample), _flat(action)
    numel = x.shape[1]
    blocks = max(1, triton.cdiv(numel, block))
    f64 = sample.dtype == torch.float64
    log_prob = torch.empty(batch, dtype=torch.float64 if f64 else torch.float32, device=sample.device)
    # one float64 partial per (sample, block), then one int32 counter per sample (zeroed)
    partial = torch.empty(batch * blocks, dtype=torch.float64, device=sample.device)
    count = torch.zeros(batch, dtype=torch.int32, device=sample.device)
    next_sample = torch.empty_like(x) if mode == _SAMPLE else x  # x: unused placeholder when scoring
    coefs, index_arg, rows, has_index = _table_args(coefs, index)
    if batch > 0:
        _sde_step_kernel[(blocks, batch)](_bits(v), _bits(x), _bits(a), _bits(next_sample), coefs, index_arg, partial,
                                          count, log_prob, numel, blocks, rows, MODE=mode,
                                          V_BF16=v.dtype == torch.bfloat16, X_BF16=x.dtype == torch.bfloat16,
                                          F64=f64, HAS_INDEX=has_index, BLOCK=block, FINAL_BLOCK=FINAL_BLOCK)
    return next_sample.reshape(sample.shape), log_prob


def sde_step_sample(model_output, sample, noise, coefs, index=None, block: int = BLOCK):
    """Rollout: (next_sample, log_prob (B,))."""
    return _run(_SAMPLE, model_output, sample, noise, coefs, index, block)


def sde_step_log_prob(model_output, sample, prev_sample, coefs, index=None, block: int = BLOCK):
    """Training: log_prob (B,) of prev_sample."""
    return _run(_SCORE, model_output, sample, prev_sample, coefs, index, block)[1]


def sde_step_backward(grad_log_prob, model_output, sample, prev_sample, coefs, index=None, block: int = BLOCK):
    """Gradient of sum_b grad_log_prob[b] * log_prob[b] w.r.t. model_output."""
    batch = sample.shape[0]
    v, x, p = _flat(model_output), _flat(sample), _flat(prev_sample)
    numel = x.shape[1]
    grad = torch.empty_like(v)
    coefs, index_arg, rows, has_index = _table_args(coefs, index)
    if batch > 0 and numel > 0:
        _sde_step_backward_kernel[(triton.cdiv(numel, block), batch)](
            _bits(v), _bits(x), _bits(p), _bits(grad), coefs, index_arg, grad_log_prob.contiguous(), numel, rows,
            V_BF16=v.dtype == torch.bfloat16, X_BF16=x.dtype == torch.bfloat16, F64=sample.dtype == torch.float64,
            HAS_INDEX=has_index, BLOCK=block)
    return grad.reshape(model_output.shape)
