"""Loading the compiled extensions: the ahead-of-time build, or a just-in-time one.

`setup.py` builds `dancegrpo._ops_cpu` (and `dancegrpo._ops_cuda` with a CUDA toolchain) at
install time. Each build carries a hash of its sources; in a source checkout whose csrc/ no
longer matches, the build is stale and is not used. A just-in-time build
(torch.utils.cpp_extension.load, cached under torch's extension directory) happens only when
asked for: `build_cpu_extension()` or the environment variable DANCEGRPO_OPS_JIT=1.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import runpy
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

JIT_ENV_VAR = "DANCEGRPO_OPS_JIT"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_BUILD_DESCRIPTION = _REPO_ROOT / "csrc" / "build.py"


@functools.lru_cache(maxsize=None)
def _build_description() -> dict | None:
    """csrc/build.py's namespace in a source checkout, None in an installed wheel."""
    if not _BUILD_DESCRIPTION.is_file():
        return None
    return runpy.run_path(str(_BUILD_DESCRIPTION))


def _jit_requested() -> bool:
    return os.environ.get(JIT_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_current(module: ModuleType, kind: str) -> bool:
    """False for a build whose sources were edited since; True when no sources are at hand."""
    build = _build_description()
    if build is None:
        return True
    return int(getattr(module, "source_hash", -1)) == build["source_hash"](kind)


def _prebuilt(name: str, kind: str) -> ModuleType | None:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        log.debug("%s not importable: %s", name, exc)
        return None
    if not _is_current(module, kind):
        log.warning("%s was built from older sources than csrc/ (re-run `bash scripts/setup_env.sh` or set "
                    "%s=1 to rebuild just in time); not using it", name, JIT_ENV_VAR)
        return None
    return module


def _jit_build(kind: str, verbose: bool = False) -> ModuleType:
    build = _build_description()
    if build is None:
        raise RuntimeError(f"cannot build the {kind} extension just in time: csrc/build.py not found next to "
                           f"the package (expected {_BUILD_DESCRIPTION}); reinstall dancegrpo from a source checkout")
    from torch.utils import cpp_extension

    log.info("building the dancegrpo %s extension just in time (first use only; cached by torch)", kind)
    if kind == "cpu":
        return cpp_extension.load(
            name="dancegrpo_ops_cpu_jit", sources=[str(s) for s in build["cpu_sources"]()],
            extra_include_paths=build["INCLUDE_DIRS"], extra_cflags=build["cpu_compile_args"](),
            extra_ldflags=build["cpu_link_args"](), verbose=verbose)
    flags = build["cuda_compile_args"]()
    return cpp_extension.load(
        name="dancegrpo_ops_cuda_jit", sources=[str(s) for s in build["cuda_sources"]()],
        extra_include_paths=build["INCLUDE_DIRS"], extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"],
        verbose=verbose)


_loaded: dict[str, ModuleType | None] = {}


def load_extension(kind: str, jit: bool | None = None) -> ModuleType | None:
    """The `kind` ("cpu" or "cuda") extension module, or None when it is not available.

    Order: a loaded module; the ahead-of-time build if it matches the sources; a just-in-time
    build when `jit` is True (default: the DANCEGRPO_OPS_JIT environment variable). A failed
    just-in-time build raises.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown extension kind {kind!r}; choose 'cpu' or 'cuda'")
    if _loaded.get(kind) is not None:
        return _loaded[kind]
    module = _prebuilt(f"dancegrpo._ops_{kind}", kind)
    if module is None and (jit if jit is not None else _jit_requested()):
        if kind == "cuda":
            import torch

            if torch.version.cuda is None:
                raise RuntimeError("cannot build the CUDA extension: this torch is a CPU build "
                                   f"(torch {torch.__version__}); install a CUDA build of torch")
        module = _jit_build(kind)
    _loaded[kind] = module
    return module


def build_cpu_extension() -> ModuleType:
    """Load the CPU extension, compiling it now if no current build exists (about a minute)."""
    module = load_extension("cpu", jit=True)
    assert module is not None
    return module
