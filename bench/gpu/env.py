"""The machine and software versions, and the fused-op extensions (built just in time if asked).

With DANCEGRPO_OPS_JIT=1 a CUDA extension that is not built yet is compiled here, once (about
40 s on an H200 host); later sections load it from torch's extension cache.
"""
from __future__ import annotations

import importlib.metadata
import platform
import time

import torch

from .common import Context

NAME = "env"
TITLE = "Machine, versions and fused-op backends"


def units(ctx: Context) -> list[str]:
    return ["env"]


def _version(package: str) -> str:
    """The installed version from the package metadata (without importing the package)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_unit(ctx: Context, unit: str) -> list[dict]:
    from bench.machine import commit, device_name
    from dancegrpo import ops
    row = dict(device=device_name(ctx.device), device_type=ctx.device.type, python=platform.python_version(),
               torch=torch.__version__, cuda=torch.version.cuda or "none", triton=_version("triton"),
               diffusers=_version("diffusers"), transformers=_version("transformers"), commit=commit())
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        row.update(device_memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}",
                   cudnn=str(torch.backends.cudnn.version()), device_count=torch.cuda.device_count())
    start = time.perf_counter()
    row["ops_backends"] = " ".join(ops.available_backends(ctx.device))   # loads (or JIT-builds) the extensions
    row["ops_load_s"] = round(time.perf_counter() - start, 1)
    row["status"] = "ok"
    return [row]


def summarize(rows: list[dict], ctx: Context) -> str:
    if not rows or rows[0].get("status") != "ok":
        return "The environment probe did not finish."
    r = rows[0]
    keys = ["device", "device_memory_gib", "capability", "device_count", "python", "torch", "cuda", "cudnn", "triton",
            "diffusers", "transformers", "ops_backends", "ops_load_s", "commit"]
    return "\n".join(f"- {k}: {r[k]}" for k in keys if k in r)
