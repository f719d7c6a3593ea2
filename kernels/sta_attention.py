"""Triton kernels of sliding-tile attention: block-sparse flash attention, forward and backward.

Inputs are already in the kernel layout: (B, heads, N, D) with N a multiple of the plan's
block size BLOCK, video tokens tile-major then text (see dancegrpo.attention.sta). Sparsity
comes as per-head block lists: for each query block, the key blocks it attends (forward,
dQ), and for each key block, the query blocks attending it (dK/dV); skipped blocks cost
nothing, so work scales with the attended fraction. Padding (video tiles that overhang the
canvas, padded text) is removed per key by an additive bias of 0 / -inf per (batch, key).

Softmax runs online in base 2 (exp2 with log2(e) folded into the scale); the forward saves
the log-sum-exp per query row and the backward recomputes probabilities from it
(FlashAttention-2, Dao 2023, Algorithms 1 and 2). The backward is two passes over the block
lists, dK/dV per key block and dQ per query block, each program writing only its own rows:
no atomics. Accumulation is float32 for fp16/bf16/fp32 inputs; fp32 inputs use IEEE
products (no TF32), so they match a float32 reference closely.

Launch shapes: a program handles BLOCK_M query rows (forward, dQ) or BLOCK_N key rows
(dK/dV) and steps through each listed block in sub-blocks of BLOCK_N keys (BLOCK_M
queries); both divide BLOCK, so one plan serves every launch shape. On a GPU they are
autotuned (with num_warps, num_stages) per (BLOCK, padded head dim, dtypes); under the
Triton interpreter (TRITON_INTERPRET=1) and when a `config` is passed, one launch shape
runs untuned (default BLOCK_M = BLOCK_N = BLOCK).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_block(ptr, offs_n, offs_d, N, D):
    return tl.load(ptr + offs_n[:, None] * D + offs_d[None, :], mask=(offs_n[:, None] < N) & (offs_d[None, :] < D),
                   other=0.0)


@triton.jit
def _sta_forward_kernel(Q, K, V, O, LSE, KEY_BIAS, KV_COUNT, KV_INDEX, qk_scale, H, N, D, NUM_QB, MAX_KV,
                        HEADS_IN_LISTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H) * HEADS_IN_LISTS
    base = bh.to(tl.int64) * N * D
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_block(Q + base, offs_m, offs_d, N, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    list_row = h * NUM_QB + (pid * BLOCK_M) // BLOCK
    count = tl.load(KV_COUNT + list_row)
    for i in range(0, count):
        kb = tl.load(KV_INDEX + list_row * MAX_KV + i)
        for j in tl.static_range(BLOCK // BLOCK_N):
            offs_n = kb * BLOCK + j * BLOCK_N + tl.arange(0, BLOCK_N)
            k = _load_block(K + base, offs_n, offs_d, N, D)
            v = _load_block(V + base, offs_n, offs_d, N, D)
            bias = tl.load(KEY_BIAS + b * N + offs_n)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked block so far: no NaN
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))  # inf: the row's p is 0 in backward
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _sta_backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KEY_BIAS, Q_COUNT, Q_INDEX, qk_scale, sm_scale,
                              H, N, D, NUM_KB, MAX_Q, HEADS_IN_LISTS: tl.constexpr, BLOCK: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H) * HEADS_IN_LISTS
    base = bh.to(tl.int64) * N * D
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_block(K + base, offs_n, offs_d, N, D)
    v = _load_block(V + base, offs_n, offs_d, N, D)
    bias = tl.load(KEY_BIAS + b * N + offs_n)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    list_row = h * NUM_KB + (pid * BLOCK_N) // BLOCK
    count = tl.load(Q_COUNT + list_row)
    for i in range(0, count):
        qb = tl.load(Q_INDEX + list_row * MAX_Q + i)
        for j in tl.static_range(BLOCK // BLOCK_M):
            offs_m = qb * BLOCK + j * BLOCK_M + tl.arange(0, BLOCK_M)
            q = _load_block(Q + base, offs_m, offs_d, N, D)
            do = _load_block(DO + base, offs_m, offs_d, N, D)
            lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m)
            delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]
            p = tl.math.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _sta_backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEY_BIAS, KV_COUNT, KV_INDEX, qk_scale, sm_scale,
                            H, N, D, NUM_QB, MAX_KV, HEADS_IN_LISTS: tl.constexpr, BLOCK: tl.constexpr,
                            BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = (bh % H) * HEADS_IN_LISTS
    base = bh.to(tl.int64) * N * D
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_block(Q + base, offs_m, offs_d, N, D)
    do = _load_block(DO + base, offs_m, offs_d, N, D)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    list_row = h * NUM_QB + (pid * BLOCK_M) // BLOCK
    count = tl.load(KV_COUNT + list_row)
    for i in range(0, count):
        kb = tl.load(KV_INDEX + list_row * MAX_KV + i)
        for j in tl.static_range(BLOCK // BLOCK_N):
            offs_n = kb * BLOCK + j * BLOCK_N + tl.arange(0, BLOCK_N)
            k = _load_block(K + base, offs_n, offs_d, N, D)
            v = _load_block(V + base, offs_n, offs_d, N, D)
            bias = tl.load(KEY_BIAS + b * N + offs_n)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + base + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))


# Launch shapes tried on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages). Sizes follow FlashAttention-2's
# choices for head dim <= 128 (128 x 64 and 64 x 64 tiles, 4-8 warps); those not dividing the plan's BLOCK
# are pruned, and a plan block under 64 runs BLOCK x BLOCK.
_SHAPES = [(128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 4, 2), (64, 64, 4, 3),
           (64, 64, 4, 2), (64, 32, 4, 3)]
_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in _SHAPES]


def _prune(configs, named_args, **kwargs):
    """Keep the launch shapes whose BLOCK_M and BLOCK_N divide the plan's BLOCK (else BLOCK x BLOCK)."""
    block = kwargs["BLOCK"] if "BLOCK" in kwargs else named_args["BLOCK"]
    kept = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0]
    return kept or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2)]


def _autotuned(kernel):
    return triton.autotune(configs=_CONFIGS, key=["BLOCK", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})(
        kernel)


_TUNED = {name: _autotuned(kernel) for name, kernel in (("forward", _sta_forward_kernel),
                                                        ("dkdv", _sta_backward_dkdv_kernel),
                                                        ("dq", _sta_backward_dq_kernel))}
_RAW = {"forward": _sta_forward_kernel, "dkdv": _sta_backward_dkdv_kernel, "dq": _sta_backward_dq_kernel}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(name: str, rows_per_program: str, n: int, bh: int, block: int, config: dict | None, *args, **meta):
    """Run kernel `name` autotuned (GPU, no config) or with one launch shape (interpreter, or `config`).

    rows_per_program: "BLOCK_M" or "BLOCK_N", the meta-parameter that splits the N rows over programs.
    config: {"BLOCK_M": m, "BLOCK_N": n} (powers of two >= 16 dividing `block`; optional num_warps, num_stages).
    """
    if config is None and not _interpreted():
        grid = lambda c: (n // c[rows_per_program], bh)  # noqa: E731
        _TUNED[name][grid](*args, BLOCK=block, **meta)
        return
    shape = {"BLOCK_M": block, "BLOCK_N": block, **(config or {})}
    for key in ("BLOCK_M", "BLOCK_N"):
        size = shape[key]
        if size < 16 or size & (size - 1) or block % size:
            raise ValueError(f"STA kernel {key} = {size} must be a power of two >= 16 dividing the block size {block}")
    _RAW[name][(n // shape[rows_per_program], bh)](*args, BLOCK=block, **meta, **shape)


def _config(q: torch.Tensor, block: int):
    if block < 16 or block & (block - 1):
        raise ValueError(f"STA kernel block size {block} must be a power of two >= 16")
    head_dim = q.shape[-1]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return head_dim, triton.next_power_of_2(max(head_dim, 16)), precision


def sta_forward(q, k, v, key_bias, kv_count, kv_index, block: int, sm_scale: float, config: dict | None = None):
    """Block-sparse attention forward. q, k, v: (B, H, N, D) contiguous, N % block == 0;
    key_bias: (B, N) float32 of 0 / -inf; kv_count: (H or 1, N/block) int32;
    kv_index: (H or 1, N/block, max) int32; config: one launch shape instead of autotuning
    (see `_launch`). Returns (out, lse in base 2: (B, H, N) float32; +inf for a row that
    attends nothing, whose output is 0)."""
    B, H, N, _ = q.shape
    head_dim, block_d, precision = _config(q, block)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    num_qb = N // block
    _launch("forward", "BLOCK_M", N, B * H, block, config,
            q, k, v, out, lse, key_bias, kv_count, kv_index, sm_scale * LOG2E, H, N, head_dim, num_qb,
            kv_index.shape[-1], HEADS_IN_LISTS=int(kv_count.shape[0] > 1), BLOCK_D=block_d, PRECISION=precision)
    return out, lse


def sta_backward(q, k, v, out, lse, grad_out, key_bias, kv_count, kv_index, q_count, q_index, block: int,
                 sm_scale: float, config: dict | None = None):
    """Gradients (dq, dk, dv) of sta_forward, recomputing probabilities from the saved lse: a dK/dV
    pass over each key block's query list, then a dQ pass over each query block's key list."""
    B, H, N, _ = q.shape
    head_dim, block_d, precision = _config(q, block)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    per_head = int(kv_count.shape[0] > 1)
    num_blocks = N // block
    _launch("dkdv", "BLOCK_N", N, B * H, block, config,
            q, k, v, grad_out, lse, delta, dk, dv, key_bias, q_count, q_index, sm_scale * LOG2E, sm_scale,
            H, N, head_dim, num_blocks, q_index.shape[-1], HEADS_IN_LISTS=per_head, BLOCK_D=block_d,
            PRECISION=precision)
    _launch("dq", "BLOCK_M", N, B * H, block, config,
            q, k, v, grad_out, lse, delta, dq, key_bias, kv_count, kv_index, sm_scale * LOG2E, sm_scale,
            H, N, head_dim, num_blocks, kv_index.shape[-1], HEADS_IN_LISTS=per_head, BLOCK_D=block_d,
            PRECISION=precision)
    return dq, dk, dv
