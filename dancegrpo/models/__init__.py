"""Generator adapters, built by name from the config's `model` section."""
from __future__ import annotations

from typing import Callable

from .base import Conditioning, GeneratorAdapter, index_cond, repeat_cond


def _toy_flux(path: str, options: dict):
    from .toy_flux import ToyFluxGenerator
    return ToyFluxGenerator.from_pretrained(path, **options)


#: name -> loader(path, options). Real generators register here as they are added.
MODEL_REGISTRY: dict[str, Callable] = {"toy_flux": _toy_flux}


def load_model(name: str, path: str = "", options: dict | None = None):
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](path, dict(options or {}))


__all__ = ["Conditioning", "GeneratorAdapter", "MODEL_REGISTRY", "index_cond", "load_model", "repeat_cond"]
