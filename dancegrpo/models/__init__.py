"""Generator adapters, built by name from the config's `model` section.

Each generator's module defines its adapter and its `ModelSpec` (models/spec.py); the one line
below registers the built-in ones. Importing this package imports no diffusers or transformers:
adapters import them when they load weights.
"""
from __future__ import annotations

from . import flux, hunyuan_video, qwen_image, sd14, sd35, skyreels_i2v, toy_flux, wan, wan_i2v
from .base import Conditioning, GeneratorAdapter, index_cond, repeat_cond
from .spec import (
    BlockLists,
    ModelSpec,
    block_classes,
    denoiser_blocks,
    get_model_spec,
    model_names,
    register_model,
    unregister_model,
)

for _spec in (toy_flux.SPEC, sd14.SPEC, flux.SPEC, hunyuan_video.SPEC, skyreels_i2v.SPEC, sd35.SPEC,
              qwen_image.SPEC, wan.SPEC, wan_i2v.SPEC):
    register_model(_spec)


def load_model(name: str, path: str = "", options: dict | None = None):
    """The adapter of the registered model `name`, loaded from `path` with `options` (`model.options`).

    Raises ValueError for an unregistered name (listing the registered ones), and whatever the
    adapter's loader raises for a bad path or option.
    """
    return get_model_spec(name).load(path, dict(options or {}))


__all__ = ["BlockLists", "Conditioning", "GeneratorAdapter", "ModelSpec", "block_classes", "denoiser_blocks",
           "get_model_spec", "index_cond", "load_model", "model_names", "register_model", "repeat_cond",
           "unregister_model"]
