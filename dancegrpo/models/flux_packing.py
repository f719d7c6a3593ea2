"""FLUX's latent packing, shared by the FLUX.1-dev adapter (`flux.py`) and the embedded toy (`toy_flux.py`).

FLUX's transformer reads a latent image as a sequence of 2x2 patches: a (C, h, w) latent
becomes h/2 * w/2 tokens of 4C channels, each with a (0, row, col) position id. The layout
is that of diffusers' `FluxPipeline._pack_latents` / `_unpack_latents` /
`_prepare_latent_image_ids` (tests/test_models_flux.py compares a full sampling run with the
pipeline's).
"""
from __future__ import annotations

import torch


# Adapted from diffusers src/diffusers/pipelines/flux/pipeline_flux.py::FluxPipeline._pack_latents (Apache-2.0)
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX packing: (B, C, h, w) -> (B, h/2 * w/2, 4C), 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


# Adapted from diffusers src/diffusers/pipelines/flux/pipeline_flux.py::FluxPipeline._unpack_latents (Apache-2.0)
def unpack_latents(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h/2 * w/2, 4 channels) -> (B, channels, h, w)."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)


# Adapted from diffusers src/diffusers/pipelines/flux/pipeline_flux.py::FluxPipeline._prepare_latent_image_ids (Apache-2.0)  # noqa: E501
def latent_image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """FLUX image position ids: (h/2 * w/2, 3) holding (0, row, col)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()
