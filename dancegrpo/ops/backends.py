"""Which implementation runs an op: names, availability, and the one choice rule.

Every op with several implementations resolves its backend here, under one rule: the fused
ops (`fused_sde_step`, `fused_clipped_loss`) and sliding-tile attention
(`dancegrpo.attention.sta`, which registers its own implementations with
`register_op_backends`). Shared names mean the same thing for every op:

- "torch": the op's plain torch reference (always there);
- "cpp": the CPU extension (csrc/cpu), CPU tensors;
- "triton": kernels/ (GPU tensors; CPU tensors only under TRITON_INTERPRET=1);
- "cuda": the CUDA extension (csrc/cuda), GPU tensors.

An op may add backends of its own (sliding-tile attention: "flex", torch's flex_attention).
`known_backends()` lists every registered name; an op implements a subset (its `names`).

The choice, first match wins: the `backend` argument of the op; the environment variable
DANCEGRPO_OPS_BACKEND; `set_default_backend()`; "auto", the first available of the op's
preference for the tensors' device type (fused ops: cuda > triton on a GPU, cpp on the CPU;
sliding-tile attention: triton on a GPU), else "torch". A backend that is named but cannot run
(not built, wrong device, or not implemented by that op) raises, naming where the name came
from and what is available; "auto" never does: without any built extension it falls back to
torch and says so once in the log.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Mapping

import torch

from .extension import load_extension

log = logging.getLogger(__name__)

#: the fused ops' backends; also the names every op shares (see the module docstring)
BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "DANCEGRPO_OPS_BACKEND"
AUTO = "auto"
FUSED_OPS = "fused_ops"

_configured: str | None = None
_fallback_logged: set = set()   # (op, device type) pairs whose fallback to torch was logged


@dataclass(frozen=True)
class OpBackends:
    """One op's implementations under the shared rule.

    op: the key it is registered and resolved under; label: what messages call it; names: the
    backends it implements, "torch" (its plain torch reference) among them; auto: per device
    type ("cuda", "cpu", ...), the backends "auto" tries in order before falling back to
    "torch"; own: for each backend name of this op outside `BACKENDS`, a function of the device
    returning (usable, why not).
    """

    op: str
    label: str
    names: tuple[str, ...]
    auto: Mapping[str, tuple[str, ...]]
    own: Mapping[str, Callable[[torch.device], tuple[bool, str]]] = field(default_factory=dict)


_registry: dict[str, OpBackends] = {
    FUSED_OPS: OpBackends(FUSED_OPS, "the fused ops", BACKENDS, {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}),
}


def register_op_backends(spec: OpBackends) -> None:
    """Put an op under the shared rule (registering the same op again replaces it).

    Raises ValueError when `spec` lacks "torch", or names a backend outside `BACKENDS` without
    an availability function in `own`, or lists in `auto` a backend it does not implement.
    """
    if "torch" not in spec.names:
        raise ValueError(f"{spec.op}: every op needs its torch reference backend 'torch', got {spec.names}")
    for name in spec.names:
        if name not in BACKENDS and name not in spec.own:
            raise ValueError(f"{spec.op}: backend {name!r} is not one of the shared {BACKENDS}: give its "
                             "availability in `own`")
    for device_type, order in spec.auto.items():
        extra = [name for name in order if name not in spec.names]
        if extra:
            raise ValueError(f"{spec.op}: auto on {device_type} lists {extra}, which it does not implement")
    _registry[spec.op] = spec
    clear_cache()


def op_backends(op: str) -> OpBackends:
    """The registered backends of `op` (KeyError naming the registered ops)."""
    try:
        return _registry[op]
    except KeyError:
        raise KeyError(f"no op {op!r} is registered with dancegrpo.ops.backends; registered: "
                       f"{sorted(_registry)}") from None


def known_backends() -> tuple[str, ...]:
    """Every backend name some registered op implements: the shared ones, then the ops' own."""
    extra = [name for spec in _registry.values() for name in spec.names if name not in BACKENDS]
    return BACKENDS + tuple(dict.fromkeys(extra))


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name != AUTO and name not in known_backends():
        raise ValueError(f"unknown ops backend {name!r} (from {source}); choose one of {(AUTO, *known_backends())}")
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


def _usable(backend: str, device: torch.device, op: str = FUSED_OPS) -> tuple[bool, str]:
    """Whether `op` can run `backend` on tensors of `device`, and if not, why."""
    spec = op_backends(op)
    if backend not in spec.names:
        return False, f"there is no {backend} implementation of {spec.label} (implemented: {', '.join(spec.names)})"
    if backend in spec.own:
        return spec.own[backend](device)
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


def available_backends(device: torch.device | str | None = None, op: str = FUSED_OPS) -> list[str]:
    """Backends of `op` that can run here: for tensors on `device`, or on any device of this machine."""
    names = op_backends(op).names
    if device is not None:
        return [b for b in names if _usable(b, torch.device(device), op)[0]]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in names if any(_usable(b, d, op)[0] for d in devices)]


def _requested(backend: str | None) -> tuple[str, str]:
    if backend is not None:
        return _check_name(backend, "the backend argument"), "the backend argument"
    env = os.environ.get(ENV_VAR)
    if env:
        source = f"environment variable {ENV_VAR}"
        return _check_name(env, source), source
    if _configured:
        return _configured, "set_default_backend"
    return AUTO, "auto"


def requested_backend(backend: str | None = None) -> str:
    """The requested name before device resolution: argument, env var, configured default, "auto"."""
    return _requested(backend)[0]


def resolve_backend(backend: str | None, device: torch.device | str, op: str = FUSED_OPS) -> str:
    """The concrete backend that runs `op` on tensors of `device` (see the module docstring).

    Raises ValueError for an unknown name, RuntimeError for a named backend that cannot run
    (message: ``ops backend '<name>' (from <source>) cannot run <op> here: <why>. ...``).
    """
    return _resolve(backend, torch.device(device), op)


@torch._dynamo.assume_constant_result
def _resolve(backend: str | None, device: torch.device, op: str = FUSED_OPS) -> str:
    # Under torch.compile this runs once at trace time (environment, loaded extensions) and its
    # result is a constant of the graph.
    name, source = _requested(backend)
    spec = op_backends(op)
    if name != AUTO:
        ok, why = _usable(name, device, op)
        if not ok:
            raise RuntimeError(f"ops backend {name!r} (from {source}) cannot run {spec.label} here: {why}. "
                               f"Available for {device}: {available_backends(device, op)}; ask for 'auto' to "
                               "pick automatically")
        return name
    preference = spec.auto.get(device.type, ())
    for candidate in preference:
        if _usable(candidate, device, op)[0]:
            return candidate
    if preference and (op, device.type) not in _fallback_logged:
        _fallback_logged.add((op, device.type))
        log.info("dancegrpo.ops: no compiled kernels of %s for %s tensors (%s), using the torch reference ops",
                 spec.label, device.type, " / ".join(_usable(c, device, op)[1] for c in preference))
    return "torch"


# (op, backend argument, DANCEGRPO_OPS_BACKEND, device type) -> (backend name, fused ops' kernels module or None)
_resolved: dict[tuple, tuple[str, ModuleType | None]] = {}


def clear_cache() -> None:
    """Forget the backends resolved so far (set_default_backend does this itself)."""
    _resolved.clear()


def kernels_for(backend: str | None, device: torch.device) -> tuple[str, ModuleType | None]:
    """The backend that runs a fused op on `device` tensors and its kernels (None for "torch").

    The eager hot path: resolved once per (argument, environment variable, device type) and
    then a dictionary lookup. Not for use under torch.compile (see `resolve_backend`).
    """
    key = (FUSED_OPS, backend, os.environ.get(ENV_VAR), device.type)
    hit = _resolved.get(key)
    if hit is None:
        name = _resolve(backend, device)
        hit = _resolved[key] = (name, None if name == "torch" else kernels_module(name))
    return hit


def backend_for(backend: str | None, device: torch.device, op: str) -> str:
    """`resolve_backend` for eager calls: resolved once per (op, argument, environment variable,
    device type), then a dictionary lookup (errors as `resolve_backend`)."""
    key = (op, backend, os.environ.get(ENV_VAR), device.type)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = (_resolve(backend, device, op), None)
    return hit[0]
