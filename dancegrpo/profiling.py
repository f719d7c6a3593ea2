"""NVTX ranges for Nsight; free when no GPU profiler is attached.

The `nvtx` package is a no-op without a GPU, while torch.cuda.nvtx fails on CPU builds
of torch, so ranges go through the package when installed and through nothing otherwise.
"""
from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # optional dependency
    _nvtx = None


def nvtx_range(name: str):
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain="dancegrpo")
