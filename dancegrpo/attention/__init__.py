"""Sliding-tile attention (STA) for video transformers: definition, kernels, diffusers processor."""
from .sta import BACKENDS, flex_block_mask, kernel_plan, sta_attention
from .sta_mask import (
    AUTO,
    DEFAULT_TILE,
    STAMask,
    TileLayout,
    auto_tile,
    normalize_windows,
    resolve_tile,
    sta_reference,
    tile_window_mask,
    window_for_extent,
)

__all__ = ["AUTO", "BACKENDS", "DEFAULT_TILE", "STAMask", "TileLayout", "auto_tile", "flex_block_mask", "kernel_plan",
           "normalize_windows", "resolve_tile", "sta_attention", "sta_reference", "tile_window_mask",
           "window_for_extent"]
