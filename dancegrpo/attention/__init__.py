"""Sliding-tile attention (STA) for video transformers: definition, kernels, diffusers processor."""
from .sta import BACKENDS, kernel_plan, sta_attention
from .sta_mask import DEFAULT_TILE, STAMask, TileLayout, normalize_windows, sta_reference, tile_window_mask

__all__ = ["BACKENDS", "DEFAULT_TILE", "STAMask", "TileLayout", "kernel_plan", "normalize_windows", "sta_attention",
           "sta_reference", "tile_window_mask"]
