"""Sliding-tile attention (STA): the definition in plain torch.

Video tokens on a (T, H, W) canvas are grouped into tiles (the STA paper's 6x8x8 = 384
tokens, or `tile="auto"`: per canvas, the tile of `auto_tile`) and reordered tile-major; a
canvas that does not divide into tiles is padded, and padding is never attended. Per
dimension, a query tile q attends key tile k when |k - c| <= w//2 with
c = clamp(q, w//2, n_tiles-1-w//2): the window shifts inward at borders, it never shrinks;
a window >= the number of tiles is full attention in that dimension. Windows are given in
tiles, one per head or one for all heads.

Token order everywhere in the public API is the one the transformer uses: the video tokens
in raster (t, h, w) order, then the text tokens. Every image query attends all valid text
keys; text queries attend every valid key; padded text keys are masked.

A window counts tiles, so its extent in tokens is window x tile per dimension and changes
with the tile; `window_for_extent` converts an extent in tokens to tiles for a given tile.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch

DEFAULT_TILE = (6, 8, 8)      # the STA paper's tile; also the shape `auto_tile` stays closest to
AUTO = "auto"
Triple = tuple[int, int, int]


def _triple(value, name: str) -> Triple:
    values = tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} = {value!r} must be three positive integers (t, h, w)")
    return values  # type: ignore[return-value]


def auto_tile(canvas, min_block: int = 64, max_tile_tokens: int = 512, reference=DEFAULT_TILE) -> Triple:
    """The tile `tile="auto"` uses on a (T, H, W) token canvas: the fewest padded tokens a kernel tile allows.

    Candidates: tiles (t, h, w) whose token count is a multiple of `min_block` (so the Triton
    kernel runs blocks of at least that many tokens: `dancegrpo.attention.sta.block_size_for`)
    and at most `max_tile_tokens`, each side at most twice the reference tile's (12x16x16 for
    6x8x8: no tile swallows a long dimension, so windows stay local) and at most the canvas
    side rounded up to a power of two. Chosen, in order: the fewest padded tokens
    (prod(ceil(canvas / tile) * tile)); then the shape closest to `reference` (sum over the
    three sides of |log(tile / reference)|), so a window in tiles spans about the tokens it
    spans with the reference tile; then the larger kernel block (128 before 64); then the
    smallest (t, h, w). If no tile qualifies (a canvas of fewer than `min_block` tokens),
    `min_block` is halved, down to 16 (the kernel's floor).

    Examples (worked in docs/sta.md): 14x30x30 -> 2x10x16 (13440 tokens, +6.7%; 6x8x8 pads to
    18432, +46%), 30x48x80 -> 6x8x8 (no padding), 14x25x40 -> 2x4x8 (+12%; 6x8x8: +65%).
    Raises ValueError for a canvas no tile of >= 16 tokens fits.
    """
    return _auto_tile(_triple(canvas, "canvas"), int(min_block), int(max_tile_tokens),
                      _triple(reference, "reference tile"))


@functools.lru_cache(maxsize=256)
def _auto_tile(canvas: Triple, min_block: int, max_tile_tokens: int, reference: Triple) -> Triple:
    limits = [min(1 << (c - 1).bit_length(), 2 * r) for c, r in zip(canvas, reference)]
    block = min_block
    while block >= 16:
        best = None
        for tile in itertools.product(*(range(1, limit + 1) for limit in limits)):
            tokens = math.prod(tile)
            if tokens % block or tokens > max_tile_tokens:
                continue
            padded = math.prod(math.ceil(c / t) * t for c, t in zip(canvas, tile))
            distance = round(sum(abs(math.log(t / r)) for t, r in zip(tile, reference)), 9)
            key = (padded, distance, -math.gcd(tokens, 128), tile)
            best = key if best is None or key < best else best
        if best is not None:
            return best[3]
        block //= 2
    raise ValueError(f"canvas {canvas}: no STA tile of >= 16 tokens fits (the Triton kernel's smallest block); "
                     f"give an explicit tile")


def resolve_tile(tile, canvas) -> Triple:
    """`tile` as three ints: "auto" -> auto_tile(canvas); else validated (t, h, w)."""
    if isinstance(tile, str):
        if tile != AUTO:
            raise ValueError(f"tile = {tile!r}: give \"auto\" or three positive integers (t, h, w)")
        return auto_tile(canvas)
    return _triple(tile, "tile")


def window_for_extent(extent, tile) -> list:
    """A window in tiles spanning at least `extent` tokens per dimension with this tile.

    extent: [t, h, w] in tokens (or one per head); tile: (t, h, w). Per dimension the result
    is the smallest odd w with w x tile >= extent (odd because the rule spans 2*(w//2)+1
    tiles). E.g. the extent of window 1x3x3 with 6x8x8 tiles is 6x24x24 tokens; with the
    2x10x16 tile that is window 3x3x3 (6x30x48 tokens). Returns a list shaped like `extent`.
    """
    tile = _triple(tile, "tile")
    extents = torch.as_tensor(extent, dtype=torch.long)
    if extents.shape[-1:] != (3,) or extents.dim() > 2 or (extents < 1).any():
        raise ValueError(f"window extent = {extent!r} must be [t, h, w] in tokens (or one per head), each >= 1")
    tiles = -(-extents // torch.tensor(tile))                      # ceil(extent / tile)
    return (tiles + (tiles % 2 == 0).long()).tolist()             # round up to odd


@dataclass(frozen=True)
class TileLayout:
    """Tiling of a (T, H, W) token canvas: tile-major order with padding to whole tiles."""

    canvas: Triple
    tile: Triple = DEFAULT_TILE

    def __post_init__(self):
        object.__setattr__(self, "canvas", _triple(self.canvas, "canvas"))
        object.__setattr__(self, "tile", _triple(self.tile, "tile"))

    @property
    def grid(self) -> Triple:
        """Number of tiles per dimension."""
        return tuple(math.ceil(c / t) for c, t in zip(self.canvas, self.tile))  # type: ignore[return-value]

    @property
    def num_tiles(self) -> int:
        return math.prod(self.grid)

    @property
    def tile_tokens(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tokens(self) -> int:
        """Valid (unpadded) video tokens."""
        return math.prod(self.canvas)

    @property
    def padded_tokens(self) -> int:
        return self.num_tiles * self.tile_tokens

    @cached_property
    def source_index(self) -> torch.Tensor:
        """(padded_tokens,) int64: for each tile-major position, the raster index of its video
        token, or -1 for padding."""
        (T, H, W), (tt, th, tw), (gt, gh, gw) = self.canvas, self.tile, self.grid
        # axes (tile_t, tile_h, tile_w, in_t, in_h, in_w) -> coordinates on the padded canvas
        shape = (gt, gh, gw, tt, th, tw)
        tc = torch.arange(gt * tt).view(gt, 1, 1, tt, 1, 1).expand(shape)
        hc = torch.arange(gh * th).view(1, gh, 1, 1, th, 1).expand(shape)
        wc = torch.arange(gw * tw).view(1, 1, gw, 1, 1, tw).expand(shape)
        inside = (tc < T) & (hc < H) & (wc < W)
        index = (tc * H + hc) * W + wc
        return torch.where(inside, index, torch.full_like(index, -1)).reshape(-1)

    @cached_property
    def token_valid(self) -> torch.Tensor:
        """(padded_tokens,) bool: True where a tile-major position holds a real token."""
        return self.source_index >= 0

    @cached_property
    def tile_of_token(self) -> torch.Tensor:
        """(num_tokens,) int64: tile-major tile index of each raster-order video token."""
        tiles = torch.empty(self.num_tokens, dtype=torch.long)
        valid = self.token_valid
        tiles[self.source_index[valid]] = torch.arange(self.padded_tokens)[valid] // self.tile_tokens
        return tiles

    def to_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Raster-order video tokens along `dim` -> tile-major with zero padding (differentiable)."""
        dim = dim % x.dim()
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"to_tiles: {x.shape[dim]} tokens along dim {dim}, canvas {self.canvas} has "
                             f"{self.num_tokens}")
        index = self.source_index.to(x.device).clamp(min=0)
        out = x.index_select(dim, index)
        shape = [1] * x.dim()
        shape[dim] = -1
        return out * self.token_valid.to(x.device).view(shape).to(x.dtype)

    def from_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of to_tiles: tile-major (padded) -> raster order, padding dropped."""
        dim = dim % x.dim()
        if x.shape[dim] != self.padded_tokens:
            raise ValueError(f"from_tiles: {x.shape[dim]} tokens along dim {dim}, expected {self.padded_tokens}")
        order = torch.empty(self.num_tokens, dtype=torch.long)
        valid = self.token_valid
        order[self.source_index[valid]] = torch.arange(self.padded_tokens)[valid]
        return x.index_select(dim, order.to(x.device))


def normalize_windows(window, heads: int | None = None) -> torch.Tensor:
    """Windows as an int64 (heads or 1, 3) tensor from [t, h, w] or a per-head list of them."""
    w = torch.as_tensor(window, dtype=torch.long)
    if w.dim() == 1:
        w = w[None]
    if w.dim() != 2 or w.shape[1] != 3 or (w < 1).any():
        raise ValueError(f"window = {window!r} must be [t, h, w] or one [t, h, w] per head, in tiles, each >= 1")
    if heads is not None and w.shape[0] not in (1, heads):
        raise ValueError(f"window gives {w.shape[0]} per-head windows but attention has {heads} heads")
    return w


def tile_window_mask(grid: Triple, window) -> torch.Tensor:
    """(heads or 1, n_tiles, n_tiles) bool: query tile (row) attends key tile (column)."""
    windows = normalize_windows(window)
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    n = torch.tensor(grid)
    half = windows // 2                                            # (heads, 3)
    full = windows >= n                                            # full attention in that dimension
    low, high = half, n - 1 - half                                 # clamp interval for the centre
    centre = torch.maximum(torch.minimum(coords[None], high[:, None]), low[:, None])  # (heads, tiles, 3)
    near = (coords[None, None, :, :] - centre[:, :, None, :]).abs() <= half[:, None, None, :]
    return (near | full[:, None, None, :]).all(-1)


@dataclass(frozen=True)
class STAMask:
    """The STA attention pattern of one call: canvas tiling, windows and text length."""

    layout: TileLayout
    windows: torch.Tensor          # (heads or 1, 3) int64, in tiles
    text_tokens: int = 0

    @classmethod
    def build(cls, canvas, window, tile=AUTO, text_tokens: int = 0, heads: int | None = None) -> "STAMask":
        """tile: (t, h, w) or "auto" (`auto_tile` of the canvas); window in tiles."""
        return cls(TileLayout(canvas, resolve_tile(tile, canvas)), normalize_windows(window, heads), int(text_tokens))

    @cached_property
    def tile_mask(self) -> torch.Tensor:
        """(heads or 1, n_tiles, n_tiles) bool block mask between video tiles (tile-major)."""
        return tile_window_mask(self.layout.grid, self.windows)

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens + self.text_tokens

    def dense_mask(self, text_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean token mask in the transformer's order (video raster, then text).

        Returns (B or 1, heads or 1, N, N); `text_valid` is (B, text_tokens) bool (None = all valid).
        """
        tiles = self.layout.tile_of_token
        video = self.tile_mask[:, tiles][:, :, tiles]              # (h, Nv, Nv)
        heads, nv, nt = video.shape[0], self.layout.num_tokens, self.text_tokens
        if text_valid is None:
            text_valid = torch.ones(1, nt, dtype=torch.bool)
        text_valid = text_valid.to(torch.bool).cpu()
        if text_valid.shape[-1] != nt:
            raise ValueError(f"text_valid has {text_valid.shape[-1]} tokens, the mask was built for {nt}")
        batch = text_valid.shape[0]
        mask = torch.zeros(batch, heads, nv + nt, nv + nt, dtype=torch.bool)
        mask[:, :, :nv, :nv] = video
        key_valid = torch.cat([torch.ones(batch, nv, dtype=torch.bool), text_valid], 1)  # (B, N)
        mask[:, :, :nv, nv:] = text_valid[:, None, None, :]        # image queries: all valid text
        mask[:, :, nv:, :] = key_valid[:, None, None, :]           # text queries: everything valid
        return mask


def sta_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, canvas, window, tile=AUTO,
                  text_valid: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """STA as dense attention (SDPA) with the equivalent boolean mask.

    q, k, v: (B, heads, N, D) with N = T*H*W video tokens (raster order) + text tokens;
    text_valid: (B, text tokens) bool, None = all valid; tile: (t, h, w) or "auto".
    """
    text_tokens = q.shape[-2] - math.prod(canvas)
    if text_tokens < 0:
        raise ValueError(f"sta_reference: {q.shape[-2]} tokens is fewer than the canvas {tuple(canvas)} holds")
    mask = STAMask.build(canvas, window, tile, text_tokens, heads=q.shape[1]).dense_mask(text_valid)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), scale=scale)
