"""Atomic, verifiable training checkpoints: one package, one manager that chooses the format.

Modules, each importing only those listed before it (no cycle):

- `codec`    how files are written and read: safetensors tensor files, JSON state with tags for
             tuples / int-keyed dicts / tensors, SHA-256 and checksummed JSON, fsync;
             `CheckpointError`
- `layout`   where checkpoints live and what a valid one holds: ``<run_dir>/checkpoints/step_<NNNNNNNN>/``,
             file names of both formats, listing, verification, newest valid, atomic publish
             (``.tmp-*`` then rename) and keep-last pruning
- `local`    the single-process format (safetensors + ``state.json``, with RNG states)
- `sharded`  the multi-process format (torch.distributed.checkpoint ``dcp/`` + ``meta.json``),
             loadable on any world size; imported lazily (it loads DCP)
- `manager`  `CheckpointManager`: save / load / latest / export-final, the only place where a
             format is chosen (by the run for writing, by the folder and the model for reading)

The trainer and `dancegrpo eval` use `CheckpointManager`. `save_checkpoint` / `load_checkpoint`
(local format) checkpoint any module from user code.
"""
from .codec import CheckpointError
from .layout import (CHECKPOINTS_SUBDIR, DCP_DIR, EMA_FILE, META_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE,
                     SCHEDULER_FILE, STATE_FILE, is_sharded_checkpoint, latest_checkpoint, list_checkpoints,
                     looks_like_checkpoint, verify_checkpoint)
from .local import load_checkpoint, save_checkpoint
from .manager import FINAL_MODEL_DIR, CheckpointManager

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "is_sharded_checkpoint",
    "looks_like_checkpoint",
    "CHECKPOINTS_SUBDIR",
    "FINAL_MODEL_DIR",
    "STATE_FILE",
    "MODEL_FILE",
    "EMA_FILE",
    "OPTIMIZER_FILE",
    "SCHEDULER_FILE",
    "RNG_FILE",
    "DCP_DIR",
    "META_FILE",
]
