"""Sliding-tile attention: the Triton kernel behind torch.autograd, flex_attention, and a dispatcher.

`sta_attention(q, k, v, canvas, window, ...)` takes tokens in the transformer's order (video
raster order, then text) and returns the same layout. The Triton backend packs them into the
kernel layout: video tile-major, each tile padded to whole tiles, then text padded to a
whole block; kernel blocks are a power of two dividing the tile (128 for 6x8x8 = 384), so a
block never straddles two tiles and the tile mask is also the block mask.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sta_mask import DEFAULT_TILE, STAMask, normalize_windows, sta_reference

BACKENDS = ("auto", "triton", "flex", "reference")


def block_size_for(tile_tokens: int, largest: int = 128) -> int:
    """The largest power of two <= `largest` that divides the tokens of a tile (>= 16 for tl.dot)."""
    block = largest
    while block >= 16 and tile_tokens % block:
        block //= 2
    if block < 16:
        raise ValueError(f"STA tile of {tile_tokens} tokens: the Triton kernel needs tiles whose token count is a "
                         "multiple of 16 (e.g. 6x8x8 = 384, 2x2x4 = 16); pick another tile")
    return block


@dataclass(frozen=True)
class KernelPlan:
    """Kernel layout and block lists of one STA pattern (cached per pattern and device)."""

    mask: STAMask
    block: int
    text_padded: int
    block_mask: torch.Tensor   # (heads or 1, NB, NB) bool
    kv_count: torch.Tensor     # (heads or 1, NB) int32: key blocks per query block
    kv_index: torch.Tensor     # (heads or 1, NB, max) int32
    q_count: torch.Tensor      # (heads or 1, NB) int32: query blocks per key block
    q_index: torch.Tensor      # (heads or 1, NB, max) int32

    @property
    def video_padded(self) -> int:
        return self.mask.layout.padded_tokens

    @property
    def num_tokens(self) -> int:
        return self.video_padded + self.text_padded

    def key_bias(self, text_valid: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(B, N) float32: 0 for real keys, -inf for video padding and padded/invalid text."""
        nt = self.mask.text_tokens
        text = torch.ones(batch, nt, dtype=torch.bool, device=device) if text_valid is None else \
            text_valid.to(device=device, dtype=torch.bool).expand(batch, nt)
        valid = torch.cat([self.mask.layout.token_valid.to(device).expand(batch, -1), text,
                           torch.zeros(batch, self.text_padded - nt, dtype=torch.bool, device=device)], 1)
        return torch.zeros(valid.shape, device=device).masked_fill(~valid, float("-inf")).contiguous()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, video + text, D) transformer order -> (B, H, N, D) kernel layout (differentiable)."""
        nv = self.mask.layout.num_tokens
        video = self.mask.layout.to_tiles(x[:, :, :nv], dim=2)
        text = F.pad(x[:, :, nv:], (0, 0, 0, self.text_padded - self.mask.text_tokens))
        return torch.cat([video, text], 2).contiguous()

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        video = self.mask.layout.from_tiles(x[:, :, :self.video_padded], dim=2)
        return torch.cat([video, x[:, :, self.video_padded:self.video_padded + self.mask.text_tokens]], 2)


def _lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise lists of True columns: counts (rows,) and indices padded to the longest row."""
    count = mask.sum(-1)
    width = max(int(count.max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    return count.to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _plan(canvas: tuple, tile: tuple, windows: tuple, text_tokens: int, device: str) -> KernelPlan:
    mask = STAMask.build(canvas, windows, tile, text_tokens)
    layout = mask.layout
    block = block_size_for(layout.tile_tokens)
    text_padded = math.ceil(text_tokens / block) * block
    nvb, ntb = layout.padded_tokens // block, text_padded // block
    # a key block is skipped when it holds no real token (video padding, text rounding)
    video_block_real = layout.token_valid.view(nvb, block).any(1)
    text_block_real = (torch.arange(text_padded).view(ntb, block) < text_tokens).any(1) if ntb else \
        torch.zeros(0, dtype=torch.bool)
    key_real = torch.cat([video_block_real, text_block_real])
    tile_of_block = torch.arange(nvb) * block // layout.tile_tokens
    heads = mask.tile_mask.shape[0]
    blocks = torch.zeros(heads, nvb + ntb, nvb + ntb, dtype=torch.bool)
    blocks[:, :nvb, :nvb] = mask.tile_mask[:, tile_of_block][:, :, tile_of_block]
    blocks[:, :nvb, nvb:] = True
    blocks[:, nvb:, :] = True
    blocks &= key_real
    kv_count, kv_index = _lists(blocks)
    q_count, q_index = _lists(blocks.transpose(1, 2))
    dev = torch.device(device)
    return KernelPlan(mask, block, text_padded, blocks.to(dev), kv_count.to(dev), kv_index.to(dev),
                      q_count.to(dev), q_index.to(dev))


def kernel_plan(canvas, window, tile=DEFAULT_TILE, text_tokens: int = 0, heads: int | None = None,
                device: torch.device | str = "cpu") -> KernelPlan:
    """The cached kernel layout and block lists of an STA pattern."""
    windows = tuple(map(tuple, normalize_windows(window, heads).tolist()))
    return _plan(tuple(canvas), tuple(tile), windows, int(text_tokens), str(torch.device(device)))


def _kernels():
    from ..ops.triton_kernels import load_triton_kernels
    load_triton_kernels()
    return importlib.import_module("dancegrpo.kernels.sta_attention")


class STAFunction(torch.autograd.Function):
    """The Triton kernels on packed (B, H, N, D) tensors; backward recomputes from the saved lse."""

    @staticmethod
    def forward(ctx, q, k, v, key_bias, plan: KernelPlan, scale: float):
        kernels = _kernels()
        out, lse = kernels.sta_forward(q, k, v, key_bias, plan.kv_count, plan.kv_index, plan.block, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_bias)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_bias = ctx.saved_tensors
        plan = ctx.plan
        dq, dk, dv = _kernels().sta_backward(q, k, v, out, lse, grad_out, key_bias, plan.kv_count, plan.kv_index,
                                             plan.q_count, plan.q_index, plan.block, ctx.scale)
        return dq, dk, dv, None, None, None


def _flex(q, k, v, plan: KernelPlan, key_bias: torch.Tensor, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    blocks, block = plan.block_mask, plan.block
    key_valid = torch.isfinite(key_bias)
    per_head = blocks.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[h if per_head else 0, q_idx // block, kv_idx // block] & key_valid[b, kv_idx]

    B, H, N, _ = q.shape
    block_mask = create_block_mask(mask_mod, B, H, N, N, device=q.device, BLOCK_SIZE=block)
    # flex_attention is only fast compiled; on the CPU it runs eagerly (forward only in torch 2.13)
    attend = _compiled_flex() if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=block_mask, scale=scale)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def sta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, canvas, window, tile=DEFAULT_TILE,
                  text_valid: torch.Tensor | None = None, scale: float | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Sliding-tile attention.

    q, k, v: (B, heads, N, D), N = T*H*W video tokens in raster order followed by text tokens;
    canvas: (T, H, W) in tokens; window: [t, h, w] in tiles, or one per head; text_valid:
    (B, text tokens) bool, None = all valid. backend: "triton" (CUDA, or the Triton interpreter),
    "flex" (torch flex_attention with the same block mask), "reference" (SDPA with the dense
    mask), or "auto" = triton on CUDA, else reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"STA backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "reference":
        return sta_reference(q, k, v, canvas, window, tile, text_valid, scale)
    text_tokens = q.shape[2] - math.prod(canvas)
    if text_tokens < 0:
        raise ValueError(f"sta_attention: {q.shape[2]} tokens is fewer than the canvas {tuple(canvas)} holds")
    plan = kernel_plan(canvas, window, tile, text_tokens, q.shape[1], q.device)
    key_bias = plan.key_bias(text_valid, q.shape[0], q.device)
    packed = [plan.pack(x) for x in (q, k, v)]
    if backend == "flex":
        out = _flex(*packed, plan, key_bias, scale)
    else:
        out = STAFunction.apply(*packed, key_bias, plan, scale)
    return plan.unpack(out)
