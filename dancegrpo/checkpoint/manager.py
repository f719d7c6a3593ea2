"""`CheckpointManager`: the one place that chooses a checkpoint format.

Writing: a multi-process run (``distributed=True``, every rank calls `save`) writes the sharded
format (`dancegrpo.checkpoint.sharded`), a single process the local format
(`dancegrpo.checkpoint.local`). Reading: the folder's content decides (`layout.is_sharded_checkpoint`),
then whether the model it goes into is FSDP-sharded:

=====================  =====================  ===========================================
checkpoint folder      model                  loader
=====================  =====================  ===========================================
sharded (``dcp/``)     any (any world size)   `sharded.load_sharded_checkpoint` (DCP reshards)
local                  FSDP-sharded           `sharded.load_full_checkpoint_into_sharded`
local                  plain                  `local.load_checkpoint`
=====================  =====================  ===========================================

The final export (`export_final`) writes ``<run_dir>/final_model/`` in the model's own format:
from rank 0 directly, or, for an FSDP-sharded model, by gathering the full weights to rank 0's
CPU and loading them into a fresh unsharded copy of the model.

The sharded module imports torch.distributed.checkpoint (seconds); it is imported only when a
sharded path is taken, so single-process runs and ``import dancegrpo.checkpoint`` stay quick.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .layout import EMA_FILE, is_sharded_checkpoint, latest_checkpoint, verify_sharded_checkpoint
from .local import load_checkpoint, save_checkpoint

__all__ = ["CheckpointManager", "FINAL_MODEL_DIR"]

#: The exported model's folder inside the run folder.
FINAL_MODEL_DIR = "final_model"


class CheckpointManager:
    """Save, find, load and export a run's checkpoints, in the format the run calls for.

    Args:
        run_dir: the run folder (checkpoints go to ``<run_dir>/checkpoints/step_<N>/``); may be
            None for a manager that only loads given checkpoint folders (`load`, `has_ema`).
        distributed: True when several processes train together (torchrun); every rank then
            calls `save` and `export_final`, and checkpoints are written sharded.
        sharded: True when the model's parameters are FSDP-sharded (needs ``distributed``).
        keep_last: checkpoints kept after each save (None keeps all); must be >= 1.
        is_main: True on the process that writes single-writer files (rank 0).

    Raises ValueError for ``sharded`` without ``distributed`` or ``keep_last < 1``.
    """

    def __init__(self, run_dir: str | os.PathLike | None, *, distributed: bool = False, sharded: bool = False,
                 keep_last: int | None = 2, is_main: bool = True):
        if sharded and not distributed:
            raise ValueError("sharded=True (an FSDP-sharded model) needs distributed=True (several processes)")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.distributed = distributed
        self.sharded = sharded
        self.keep_last = keep_last
        self.is_main = is_main

    def _require_run_dir(self, what: str) -> Path:
        if self.run_dir is None:
            raise ValueError(f"CheckpointManager.{what} needs a run folder: build the manager with run_dir")
        return self.run_dir

    @property
    def final_model_dir(self) -> Path:
        """``<run_dir>/final_model``."""
        return self._require_run_dir("final_model_dir") / FINAL_MODEL_DIR

    def latest(self) -> Path | None:
        """The newest checkpoint of the run folder that verifies (either format), or None."""
        return latest_checkpoint(self._require_run_dir("latest"))

    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any | None = None, ema: Mapping[str, torch.Tensor] | None = None,
             extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``<run_dir>/checkpoints/step_<step>`` atomically and prune to `keep_last`.

        Distributed: the sharded format, a collective (every rank calls it, with its own shards;
        FSDP parameters must be in their sharded form). Single process: the local format, with
        the global RNG states. Returns the checkpoint folder.
        """
        run_dir = self._require_run_dir("save")
        if self.distributed:
            from .sharded import save_sharded_checkpoint
            return save_sharded_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                           ema=ema, extra=extra, keep_last=self.keep_last)
        return save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                               extra=extra, keep_last=self.keep_last)

    def load(self, path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any | None = None, ema: dict[str, torch.Tensor] | None = None,
             restore_global_rng: bool = True) -> dict[str, Any]:
        """Verify the checkpoint folder `path` (either format) and restore the given objects in place.

        The loader follows the table in the module docstring. `restore_global_rng` restores the
        global RNG states stored by the local format into a plain model (the sharded format stores
        none). Returns at least ``{"step": int, "extra": dict}``; CheckpointError if the folder is
        corrupted, lacks a part that was asked for, or does not fit the objects.
        """
        if is_sharded_checkpoint(path):
            from .sharded import load_sharded_checkpoint
            return load_sharded_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
        if self.sharded:  # every rank reads the whole files and keeps its shards
            from .sharded import load_full_checkpoint_into_sharded
            return load_full_checkpoint_into_sharded(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                                     ema=ema)
        return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                               restore_global_rng=restore_global_rng)

    @staticmethod
    def has_ema(path: str | os.PathLike) -> bool:
        """True if the checkpoint folder `path` holds EMA weights (``ema.safetensors``, or
        ``has_ema`` in a sharded checkpoint's verified ``meta.json``)."""
        if is_sharded_checkpoint(path):
            return bool(verify_sharded_checkpoint(path)["has_ema"])
        return (Path(path) / EMA_FILE).is_file()

    def export_final(self, adapter, *, model: nn.Module,
                     weights: Callable[[], ContextManager] = contextlib.nullcontext,
                     fresh_adapter: Callable[[], Any] | None = None) -> Path:
        """Write ``<run_dir>/final_model/`` with ``adapter.save_pretrained`` (the model's own format).

        `weights()` is entered around reading the weights (e.g. swapping the EMA weights in).
        Plain model: rank 0 saves `adapter`. FSDP-sharded `model` (every rank calls this): the
        full weights of `model` are gathered to rank 0's CPU, loaded into ``fresh_adapter()`` (an
        unsharded copy of the model, built on rank 0 only) whose ``trainable`` must take `model`'s
        state dict, and saved from there; the ranks then wait for rank 0. Returns the folder.
        """
        out = self.final_model_dir
        if self.sharded and fresh_adapter is None:
            raise ValueError("export_final of an FSDP-sharded model needs fresh_adapter (an unsharded copy)")
        with weights():
            if not self.sharded:
                if self.is_main:
                    adapter.save_pretrained(out)
                return out
            from .sharded import gather_full_model_state
            full = gather_full_model_state(model)
        if self.is_main:
            fresh = fresh_adapter()
            fresh.trainable.load_state_dict(full)
            fresh.save_pretrained(out)
        dist.barrier()
        return out
