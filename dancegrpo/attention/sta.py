"""Sliding-tile attention: the Triton kernel behind torch.autograd, flex_attention, and its backends.

`sta_attention(q, k, v, canvas, window, ...)` takes tokens in the transformer's order (video
raster order, then text) and returns the same layout. The Triton and flex backends pack
them into the kernel layout: video tile-major, each tile padded to whole tiles, then text
padded to a whole block; kernel blocks are a power of two dividing the tile (128 for 6x8x8 =
384, 64 for 2x10x16 = 320), so a block never straddles two tiles and the tile mask is also
the block mask. The kernel plan lists, per query block, the key blocks it attends; blocks
holding no real token (video padding, text rounding) are skipped both as keys and as
queries (their output rows are dropped by `unpack` anyway).

The backend is chosen by dancegrpo.ops' one rule (`dancegrpo.ops.backends`), where this module
registers sliding-tile attention's implementations: torch (the dense-mask reference), triton
and flex (its own).
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.backends import AUTO as AUTO_BACKEND, OpBackends, backend_for, register_op_backends, resolve_backend
from .sta_mask import AUTO, STAMask, normalize_windows, resolve_tile, sta_reference

#: the key sliding-tile attention resolves its backend under (dancegrpo.ops.backends)
STA_OP = "sta"
#: every accepted `backend` of `sta_attention` and value of `model.options.sta.backend`
BACKENDS = (AUTO_BACKEND, "torch", "triton", "flex")
#: former names, refused with the new one
RENAMED = {"reference": "torch"}


def _flex_usable(device: torch.device) -> tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False, "this torch has no torch.nn.attention.flex_attention (torch >= 2.5 has it)"
    return True, ""


register_op_backends(OpBackends(
    STA_OP, "sliding-tile attention", names=("torch", "triton", "flex"), auto={"cuda": ("triton",)},
    own={"flex": _flex_usable}))


def renamed_backend_message(name, where: str) -> str | None:
    """The refusal of a former STA backend name (`where` = e.g. "sta.backend"), or None."""
    if isinstance(name, str) and name in RENAMED:
        return (f"{where} = {name!r} was renamed {RENAMED[name]!r} (the dense-mask torch reference, named like "
                f"dancegrpo.ops' backends): use {RENAMED[name]!r}")
    return None


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
    block_mask: torch.Tensor   # (heads or 1, NB, NB) bool: query block (row) attends key block (column)
    kv_count: torch.Tensor     # (heads or 1, NB) int32: key blocks per query block
    kv_index: torch.Tensor     # (heads or 1, NB, max) int32
    q_count: torch.Tensor      # (heads or 1, NB) int32: query blocks per key block
    q_index: torch.Tensor      # (heads or 1, NB, max) int32
    block_real: torch.Tensor   # (NB,) bool: the block holds at least one real token (video or text)
    block_all_real: torch.Tensor  # (NB,) bool: every token of the block is real (no video or text padding)
    attended_blocks: int       # block_mask.sum() (over heads), counted on the host when the plan was built
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # derived tensors (flex lists)

    @property
    def tile(self) -> tuple[int, int, int]:
        return self.mask.layout.tile

    @property
    def attended_pairs(self) -> int:
        """(query, key) pairs the kernel computes, summed over the heads of block_mask: blocks x block^2."""
        return self.attended_blocks * self.block ** 2

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
    # a block is skipped (as key and as query) when it holds no real token (video padding, text rounding)
    video_tokens = layout.token_valid.view(nvb, block)
    text_positions = (torch.arange(text_padded) < text_tokens).view(ntb, block)
    real = torch.cat([video_tokens.any(1), text_positions.any(1)])
    all_real = torch.cat([video_tokens.all(1), text_positions.all(1)])
    tile_of_block = torch.arange(nvb) * block // layout.tile_tokens
    heads = mask.tile_mask.shape[0]
    blocks = torch.zeros(heads, nvb + ntb, nvb + ntb, dtype=torch.bool)
    blocks[:, :nvb, :nvb] = mask.tile_mask[:, tile_of_block][:, :, tile_of_block]
    blocks[:, :nvb, nvb:] = True
    blocks[:, nvb:, :] = True
    blocks &= real[None, :] & real[:, None]
    kv_count, kv_index = _lists(blocks)
    q_count, q_index = _lists(blocks.transpose(1, 2))
    dev = torch.device(device)
    return KernelPlan(mask, block, text_padded, blocks.to(dev), kv_count.to(dev), kv_index.to(dev),
                      q_count.to(dev), q_index.to(dev), real.to(dev), all_real.to(dev), int(blocks.sum()))


def kernel_plan(canvas, window, tile=AUTO, text_tokens: int = 0, heads: int | None = None,
                device: torch.device | str = "cpu") -> KernelPlan:
    """The cached kernel layout and block lists of an STA pattern (tile: (t, h, w) or "auto")."""
    windows = tuple(map(tuple, normalize_windows(window, heads).tolist()))
    tile = resolve_tile(tile, canvas)
    return _plan(tuple(int(c) for c in canvas), tile, windows, int(text_tokens), str(torch.device(device)))


def _kernels():
    from ..ops.triton_kernels import load_triton_kernels
    load_triton_kernels()
    return importlib.import_module("dancegrpo.kernels.sta_attention")


class STAFunction(torch.autograd.Function):
    """The Triton kernels on packed (B, H, N, D) tensors; backward recomputes from the saved lse.

    config: None = autotuned launch shapes on a GPU (one default shape under the interpreter),
    or {"BLOCK_M": m, "BLOCK_N": n} to force one (kernels.sta_attention._launch)."""

    @staticmethod
    def forward(ctx, q, k, v, key_bias, plan: KernelPlan, scale: float, config: dict | None = None):
        kernels = _kernels()
        out, lse = kernels.sta_forward(q, k, v, key_bias, plan.kv_count, plan.kv_index, plan.block, scale, config)
        ctx.save_for_backward(q, k, v, out, lse, key_bias)
        ctx.plan, ctx.scale, ctx.config = plan, scale, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_bias = ctx.saved_tensors
        plan = ctx.plan
        dq, dk, dv = _kernels().sta_backward(q, k, v, out, lse, grad_out, key_bias, plan.kv_count, plan.kv_index,
                                             plan.q_count, plan.q_index, plan.block, ctx.scale, ctx.config)
        return dq, dk, dv, None, None, None, None


def _full_width_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flex_attention's (count, indices) of a (heads, rows, cols) block mask, with a batch axis of 1:
    counts (1, heads, rows) int32, indices (1, heads, rows, cols) int32, the True columns first
    in ascending order (flex_attention wants indices as wide as the number of key blocks)."""
    count = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[None].contiguous(), order[None].contiguous()


def flex_block_lists(plan: KernelPlan, all_text_valid: bool) -> dict[str, torch.Tensor]:
    """The plan's block lists split the way flex_attention's BlockMask wants them (cached per plan).

    A listed block is "full" when every key in it is real for every batch row: a video key
    block without padding, or (only when `all_text_valid`, i.e. text_valid is None) a text key
    block inside the text; flex skips the mask_mod there. Every other listed block is
    "partial": flex evaluates the mask_mod (key validity) per element. Sizes are O(heads x NB^2)
    for NB = plan.num_tokens / plan.block blocks, never O(tokens^2).
    Returns kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices (see `_full_width_lists`).
    """
    key = ("flex_lists", bool(all_text_valid))
    if key not in plan.cache:
        nvb = plan.video_padded // plan.block
        full_key = plan.block_all_real.clone()
        if not all_text_valid:
            full_key[nvb:] = False
        full = plan.block_mask & full_key
        partial = plan.block_mask & ~full_key
        (count, index), (full_count, full_index) = _full_width_lists(partial), _full_width_lists(full)
        plan.cache[key] = dict(kv_num_blocks=count, kv_indices=index, full_kv_num_blocks=full_count,
                               full_kv_indices=full_index)
    return plan.cache[key]


def flex_block_mask(plan: KernelPlan, key_bias: torch.Tensor, all_text_valid: bool = False):
    """flex_attention's BlockMask of an STA pattern, built from the kernel plan's block lists.

    key_bias: (B, N) float32 of 0 / -inf (`KernelPlan.key_bias`). The block lists come from the
    plan (`flex_block_lists`); no dense (Q x K) mask is built (unlike `create_block_mask`), so
    this runs at 720p. The mask_mod, which compiled flex evaluates only inside partial blocks,
    is the plan's block mask at (query block, key block) and the key's validity: the exact STA
    mask, since a block lies inside one query tile and one key tile. (Eager flex_attention
    ignores the block lists and applies the mask_mod everywhere, so it must be exact.)
    """
    from torch.nn.attention.flex_attention import BlockMask
    key_valid = torch.isfinite(key_bias)
    blocks, block = plan.block_mask, plan.block
    per_head = blocks.shape[0] > 1

    def sta_mask_mod(b, h, q_idx, kv_idx):
        return blocks[h if per_head else 0, q_idx // block, kv_idx // block] & key_valid[b, kv_idx]

    n = plan.num_tokens
    return BlockMask.from_kv_blocks(**flex_block_lists(plan, all_text_valid), BLOCK_SIZE=block,
                                    mask_mod=sta_mask_mod, seq_lengths=(n, n))


def flex_sta_attention(q, k, v, plan: KernelPlan, key_bias: torch.Tensor, scale: float, all_text_valid: bool = False
          ) -> torch.Tensor:
    """flex_attention on packed (B, H, N, D) tensors with the plan's BlockMask.

    On CUDA, flex_attention runs compiled (`_compiled_flex`, compiled once per process; torch
    recompiles only for new shapes); its kernel blocks are set to the plan's block when that is
    under 128 tokens (flex requires the BlockMask's blocks to be multiples of the kernel's).
    On a CPU it runs eagerly (forward only in torch 2.13): torch's eager flex_attention
    materialises the full score matrix and applies the mask_mod everywhere, a correctness path
    for small canvases only.
    """
    block_mask = flex_block_mask(plan, key_bias, all_text_valid)
    if not q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    options = None
    if plan.block < 128:
        b = plan.block
        options = {"fwd_BLOCK_M": b, "fwd_BLOCK_N": b, "bwd_BLOCK_M1": b, "bwd_BLOCK_N1": b, "bwd_BLOCK_M2": b,
                   "bwd_BLOCK_N2": b}
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def sta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, canvas, window, tile=AUTO,
                  text_valid: torch.Tensor | None = None, scale: float | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Sliding-tile attention.

    q, k, v: (B, heads, N, D), N = T*H*W video tokens in raster order followed by text tokens;
    canvas: (T, H, W) in tokens; window: [t, h, w] in tiles, or one per head; tile: (t, h, w)
    in tokens or "auto" (`auto_tile`: the fewest padded tokens for this canvas); text_valid:
    (B, text tokens) bool, None = all valid. backend: "torch" (SDPA with the dense mask, the
    definition), "triton" (the kernels in kernels/sta_attention.py; CUDA, or the Triton
    interpreter), "flex" (torch flex_attention with the same block mask), "auto", or None
    (the default). It is resolved by dancegrpo.ops' rule (`dancegrpo.ops.backends`): the
    argument, else DANCEGRPO_OPS_BACKEND, else `ops.set_default_backend`, else auto = triton on
    CUDA, torch elsewhere. ValueError for an unknown or renamed ("reference": now "torch")
    name; RuntimeError for a backend that cannot run here (e.g. triton on CPU tensors outside
    the interpreter, or a fused-op-only name such as cpp from the environment variable).
    """
    renamed = renamed_backend_message(backend, "sta_attention backend")
    if renamed:
        raise ValueError(renamed)
    backend = resolve_backend(backend, q.device, STA_OP) if torch.compiler.is_compiling() else \
        backend_for(backend, q.device, STA_OP)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "torch":
        return sta_reference(q, k, v, canvas, window, tile, text_valid, scale)
    text_tokens = q.shape[2] - math.prod(canvas)
    if text_tokens < 0:
        raise ValueError(f"sta_attention: {q.shape[2]} tokens is fewer than the canvas {tuple(canvas)} holds")
    plan = kernel_plan(canvas, window, tile, text_tokens, q.shape[1], q.device)
    key_bias = plan.key_bias(text_valid, q.shape[0], q.device)
    packed = [plan.pack(x) for x in (q, k, v)]
    if backend == "flex":
        out = flex_sta_attention(*packed, plan, key_bias, scale, all_text_valid=text_valid is None)
    else:
        out = STAFunction.apply(*packed, key_bias, plan, scale)
    return plan.unpack(out)
