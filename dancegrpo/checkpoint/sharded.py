"""The sharded checkpoint format: torch.distributed.checkpoint (DCP), loadable on any world size.

Files of ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` (names in `dancegrpo.checkpoint.layout`;
the folder names are those of the local format, so listing, pruning and `latest_checkpoint`
are shared):

- ``dcp/``        DCP files: every rank's shards of the model, the optimizer state and the EMA
                  weights, keyed by parameter name (``model.*``, ``optimizer.*``, ``ema.*``)
- ``meta.json``   format, step, world size it was written with, LR-scheduler state, whether an
                  optimizer / EMA state is stored, user ``extra``, the size of every DCP file,
                  and a checksum of itself

Atomicity: rank 0 makes ``.tmp-step_<N>``; all ranks write their shards into it; after a
barrier rank 0 writes ``meta.json`` (fsynced) and renames the folder to ``step_<N>``. A folder
without a valid ``meta.json`` is never listed as a checkpoint.

Resharding: DCP stores each tensor's global shape and which slice each file holds; loading
reads the slices the loading ranks need, so a checkpoint written by 2 FSDP ranks loads into
1 process without FSDP, and the other way round. RNG state is not stored: every draw of the
trainer comes from generators seeded by (seed, iteration, rank).

This module also reads a local-format checkpoint into an FSDP-sharded model
(`load_full_checkpoint_into_sharded`) and gathers a sharded model's full weights for export
(`gather_full_model_state`). Importing it imports torch.distributed.checkpoint (seconds), so
`dancegrpo.checkpoint.CheckpointManager` imports it only when a sharded path is taken.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .codec import CheckpointError, decode_value, encode_value, fsync_dir, json_digest, read_tensor_file
from .layout import (DCP_DIR, EMA_FILE, META_FILE, MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SHARDED_FORMAT,
                     checkpoints_dir, prune, publish, step_dir_name, tmp_dir_for, verify_checkpoint,
                     verify_sharded_checkpoint)

__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint", "load_full_checkpoint_into_sharded",
           "gather_full_model_state"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    ema: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """The DCP state dict: model and optimizer keyed by parameter name (sharded or not), EMA as is."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if ema is not None:
        state["ema"] = dict(ema)
    return state


def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                            ema: Mapping[str, torch.Tensor] | None = None, extra: Mapping[str, Any] | None = None,
                            keep_last: int | None = 2) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` with DCP; every rank must call it (a collective).

    Keeps the newest ``keep_last`` checkpoints. Returns the checkpoint folder on every rank.
    """
    root = checkpoints_dir(run_dir)
    final_dir = root / step_dir_name(step)
    tmp_dir = tmp_dir_for(final_dir)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a leftover of a killed save of this step
        (tmp_dir / DCP_DIR).mkdir(parents=True)
    _barrier()
    dcp.save(_training_state(model, optimizer, ema), checkpoint_id=tmp_dir / DCP_DIR, no_dist=not dist.is_initialized())
    _barrier()  # every shard is written before the checkpoint becomes visible
    if _rank() == 0:
        files = {str(p.relative_to(tmp_dir)): p.stat().st_size for p in sorted((tmp_dir / DCP_DIR).rglob("*"))
                 if p.is_file()}
        meta = {"format": SHARDED_FORMAT, "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "scheduler": encode_value(scheduler.state_dict(), "", None) if scheduler is not None else None,
                "has_optimizer": optimizer is not None, "has_ema": ema is not None,
                "extra": json.loads(json.dumps(dict(extra or {}), default=float)), "files": files}
        meta["meta_sha256"] = json_digest(meta, "meta_sha256")
        with open(tmp_dir / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp_dir)
        publish(tmp_dir, final_dir)
        prune(root, final_dir, keep_last)
    _barrier()
    return final_dir


def load_sharded_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                            ema: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore the given objects in place from a DCP checkpoint written on any number of ranks.

    Every rank of the loading job calls it (or one process without a process group).
    Returns ``{"step": int, "extra": dict, "world_size": int}``. CheckpointError if the folder
    is corrupted, lacks an optimizer / EMA state that was asked for, or does not fit the model.
    """
    ckpt = Path(path)
    meta = verify_sharded_checkpoint(ckpt)
    for what, given, key in (("optimizer", optimizer, "has_optimizer"), ("EMA", ema, "has_ema")):
        if given is not None and not meta[key]:
            raise CheckpointError(f"{ckpt} has no {what} state; pass {what.lower()}=None")
    state = _training_state(model, optimizer, ema)
    try:
        with warnings.catch_warnings():  # one process without a process group is what we mean
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=not dist.is_initialized())
    except Exception as err:  # DCP names the missing / mismatched keys
        raise CheckpointError(f"{ckpt / DCP_DIR} does not fit this model/optimizer: {err}") from err
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if ema is not None:  # loaded in place into the given tensors (plain or sharded)
        for name, value in state["ema"].items():
            if ema[name] is not value:
                ema[name].copy_(value)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(decode_value(meta["scheduler"], None, str(ckpt / META_FILE)))
    return {"step": int(meta["step"]), "extra": meta["extra"], "world_size": int(meta["world_size"])}


def load_full_checkpoint_into_sharded(path: str | os.PathLike, *, model: nn.Module,
                                      optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                                      ema: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore an FSDP-sharded model (and its optimizer, scheduler, EMA) from a local-format checkpoint.

    Every rank reads the whole files and keeps its shards. The single-process optimizer state is
    keyed by parameter position; it is re-keyed by parameter name for
    `set_optimizer_state_dict`. Returns ``{"step": int, "extra": dict}``.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    ckpt = Path(path)
    state = verify_checkpoint(ckpt)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, read_tensor_file(ckpt / MODEL_FILE, "cpu"), options=full)
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt} has no optimizer state; pass optimizer=None")
        saved = decode_value(state["optimizer"], read_tensor_file(ckpt / OPTIMIZER_FILE, "cpu"),
                             str(ckpt / OPTIMIZER_FILE))
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        by_name = {"state": {order[i]: value for i, value in saved["state"].items()},
                   "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                    for group in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=full)
    if ema is not None:
        loaded = read_tensor_file(ckpt / EMA_FILE, "cpu")
        with torch.no_grad():
            for name, target in ema.items():
                value = loaded[name].to(target.dtype)
                if isinstance(target, DTensor):
                    value = distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh,
                                              target.placements)
                target.copy_(value)
    if scheduler is not None:
        tensors = read_tensor_file(ckpt / SCHEDULER_FILE, "cpu") if SCHEDULER_FILE in state["files"] else {}
        scheduler.load_state_dict(decode_value(state["scheduler"], tensors, str(ckpt / SCHEDULER_FILE)))
    return {"step": int(state["step"]), "extra": state["extra"]}


def gather_full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP-sharded `model`, gathered to rank 0's CPU.

    A collective: every rank calls it. Rank 0 receives every tensor; the other ranks receive an
    empty dict (`get_model_state_dict` with ``full_state_dict=True, cpu_offload=True``)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
