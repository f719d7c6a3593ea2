"""Importing the Triton kernels of the repository's top-level kernels/ directory.

Installed, kernels/ is the subpackage `dancegrpo.kernels` (setup.py maps it); in a source
checkout that was not reinstalled since, it is loaded from its path under the same name.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "dancegrpo.kernels"
_SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels"


@functools.lru_cache(maxsize=None)
def load_triton_kernels() -> ModuleType:
    """The kernels package: sde_step_sample, sde_step_log_prob, sde_step_backward, clipped_loss."""
    try:
        return importlib.import_module(_NAME)
    except ModuleNotFoundError as exc:
        if exc.name != _NAME:
            raise
    init = _SOURCE_DIR / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"Triton kernels not found: neither the package {_NAME} nor {init} exists; "
                                  "reinstall dancegrpo (pip install -e .)")
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[str(_SOURCE_DIR)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    return module
