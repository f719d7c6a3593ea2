"""Generator adapters, built by name from the config's `model` section."""
from __future__ import annotations

from typing import Callable

from .base import Conditioning, GeneratorAdapter, index_cond, repeat_cond


def _toy_flux(path: str, options: dict):
    from .toy_flux import ToyFluxGenerator
    return ToyFluxGenerator.from_pretrained(path, **options)


def _sd14(path: str, options: dict):
    from .sd14 import SD14Generator
    return SD14Generator.from_pretrained(path, options)


def _flux(path: str, options: dict):
    from .flux import FluxGenerator
    return FluxGenerator.from_pretrained(path, options)


def _hunyuan_video(path: str, options: dict):
    from .hunyuan_video import HunyuanVideoGenerator
    return HunyuanVideoGenerator.from_pretrained(path, options)


def _skyreels_i2v(path: str, options: dict):
    from .skyreels_i2v import SkyReelsI2VGenerator
    return SkyReelsI2VGenerator.from_pretrained(path, options)


#: name -> loader(path, options). Real generators register here as they are added.
MODEL_REGISTRY: dict[str, Callable] = {"toy_flux": _toy_flux, "sd14": _sd14, "flux": _flux,
                                       "hunyuan_video": _hunyuan_video, "skyreels_i2v": _skyreels_i2v}


def load_model(name: str, path: str = "", options: dict | None = None):
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](path, dict(options or {}))


__all__ = ["Conditioning", "GeneratorAdapter", "MODEL_REGISTRY", "index_cond", "load_model", "repeat_cond"]
