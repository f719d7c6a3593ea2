"""Sliding-tile attention (STA) for video transformers: definition, kernels, diffusers processor."""
from .sta_mask import DEFAULT_TILE, STAMask, TileLayout, normalize_windows, sta_reference, tile_window_mask

__all__ = ["DEFAULT_TILE", "STAMask", "TileLayout", "normalize_windows", "sta_reference", "tile_window_mask"]
