"""Which implementation runs an op: names, availability, and the choice rules.

Backends: "torch" (the plain torch reference, always there), "cpp" (CPU extension, CPU
tensors), "triton" (kernels/, GPU tensors; CPU tensors only under TRITON_INTERPRET=1),
"cuda" (CUDA extension, GPU tensors).

The choice, first match wins: the `backend` argument of the op; the environment variable
DANCEGRPO_OPS_BACKEND; `set_default_backend()` (what a run's configuration sets); "auto",
the fastest available for the tensors' device (cuda > triton > torch on a GPU, cpp > torch
on the CPU). A backend that is named but cannot run raises; "auto" never does: without
any built extension it falls back to torch and says so once in the log.
"""
from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from .extension import load_extension

log = logging.getLogger(__name__)

BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "DANCEGRPO_OPS_BACKEND"
AUTO = "auto"

_configured: str | None = None
_fallback_logged: set[str] = set()


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r} (from {source}); choose one of {(AUTO, *BACKENDS)}")
    return name


def set_default_backend(name: str | None) -> None:
    """Set the backend used when an op gets no `backend` argument and the env var is unset.

    None or "auto" restores the automatic choice.
    """
    global _configured
    _configured = None if name is None else _check_name(name, "set_default_backend")
    clear_cache()


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_module(backend: str) -> ModuleType:
    """The module whose functions implement the kernels of `backend` (not "torch")."""
    if backend == "cpp":
        module = load_extension("cpu")
        if module is None:
            raise RuntimeError(
                "ops backend 'cpp' needs the compiled CPU extension dancegrpo._ops_cpu, which is not built (or "
                "is stale): run `bash scripts/setup_env.sh`, or call dancegrpo.ops.build_cpu_extension(), or "
                "set DANCEGRPO_OPS_JIT=1 to compile it on first use")
        return module
    if backend == "cuda":
        module = load_extension("cuda")
        if module is None:
            raise RuntimeError(
                "ops backend 'cuda' needs the compiled CUDA extension dancegrpo._ops_cuda, built by setup.py "
                "only with a CUDA build of torch and nvcc; reinstall there, or set DANCEGRPO_OPS_JIT=1")
        return module
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("ops backend 'triton' needs the triton package (pip install triton)")
        from .triton_kernels import load_triton_kernels

        return load_triton_kernels()
    raise ValueError(f"backend {backend!r} has no compiled kernels; choose one of {BACKENDS[1:]}")


def _usable(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run on tensors of `device`, and if not, why."""
    is_cuda = device.type == "cuda"
    if backend == "torch":
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors only, got {device}"
        return (load_extension("cpu") is not None), "the CPU extension dancegrpo._ops_cpu is not built"
    if backend == "cuda":
        if not is_cuda:
            return False, f"the cuda backend runs on CUDA tensors only, got {device}"
        return (load_extension("cuda") is not None), "the CUDA extension dancegrpo._ops_cuda is not built"
    if backend == "triton":
        if not _triton_importable():
            return False, "triton is not installed"
        if not is_cuda and not _triton_interpreted():
            return False, (f"triton kernels need a GPU; on {device} they run only under the interpreter "
                           "(set TRITON_INTERPRET=1 before importing triton)")
        return True, ""
    return False, f"unknown backend {backend!r}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here: for tensors on `device`, or on any device of this machine."""
    if device is not None:
        return [b for b in BACKENDS if _usable(b, torch.device(device))[0]]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(_usable(b, d)[0] for d in devices)]


def requested_backend(backend: str | None = None) -> str:
    """The requested name before device resolution: argument, env var, configured default, "auto"."""
    if backend is not None:
        return _check_name(backend, "the backend argument")
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return _configured or AUTO


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The concrete backend that runs an op on tensors of `device` (see the module docstring)."""
    return _resolve(backend, torch.device(device))


@torch._dynamo.assume_constant_result
def _resolve(backend: str | None, device: torch.device) -> str:
    # Under torch.compile this runs once at trace time (environment, loaded extensions) and its
    # result is a constant of the graph.
    name = requested_backend(backend)
    if name != AUTO:
        ok, why = _usable(name, device)
        if not ok:
            raise RuntimeError(f"ops backend {name!r} cannot run here: {why}. Available for {device}: "
                               f"{available_backends(device)}; pass backend='auto' to pick automatically")
        return name
    preference = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for candidate in preference:
        if _usable(candidate, device)[0]:
            return candidate
    if device.type not in _fallback_logged:
        _fallback_logged.add(device.type)
        log.info("dancegrpo.ops: no compiled kernels for %s tensors (%s), using the torch reference ops",
                 device.type, " / ".join(_usable(c, device)[1] for c in preference))
    return "torch"


# (backend argument, DANCEGRPO_OPS_BACKEND, device type) -> (backend name, its kernels module or None)
_resolved: dict[tuple, tuple[str, ModuleType | None]] = {}


def clear_cache() -> None:
    """Forget the backends resolved so far (set_default_backend does this itself)."""
    _resolved.clear()


def kernels_for(backend: str | None, device: torch.device) -> tuple[str, ModuleType | None]:
    """The backend that runs an op on `device` tensors and its kernels (None for "torch").

    The eager hot path: resolved once per (argument, environment variable, device type) and
    then a dictionary lookup. Not for use under torch.compile (see `resolve_backend`).
    """
    key = (backend, os.environ.get(ENV_VAR), device.type)
    hit = _resolved.get(key)
    if hit is None:
        name = _resolve(backend, device)
        hit = _resolved[key] = (name, None if name == "torch" else kernels_module(name))
    return hit
