"""The local (single-process) checkpoint format: safetensors files plus ``state.json``.

Files of ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` (names in `dancegrpo.checkpoint.layout`):
``model.safetensors``, optional ``ema.safetensors``, ``optimizer.safetensors``,
``scheduler.safetensors`` (only if the scheduler state holds tensors), ``rng.safetensors`` and
``state.json`` (step, the JSON parts of optimizer/scheduler/RNG state, user ``extra``, the
size and SHA-256 of every file, its own checksum).

``rng.safetensors`` keys: ``torch_cpu``, ``cuda.<i>`` per visible CUDA device, and
``generator.<name>`` per named generator; ``state.json["rng"]`` holds ``cuda_devices``, the
Python ``random`` state, the NumPy legacy state and each generator's device.

Only one process (e.g. rank 0) should save into a run directory at a time. Any module can be
saved this way; `dancegrpo.checkpoint.CheckpointManager` picks this format for
single-process runs.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .codec import (CheckpointError, decode_value, encode_value, fsync_dir, json_default, json_digest,
                    load_tensors_into, read_tensor_file, sha256_of, state_of, write_json_file, write_tensor_file)
from .layout import (EMA_FILE, LOCAL_FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, SCHEDULER_FILE, STATE_FILE,
                     checkpoints_dir, clean_tmp_dirs, is_sharded_checkpoint, prune, publish, step_dir_name,
                     tmp_dir_for, verify_checkpoint)

__all__ = ["save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- RNG state


def _capture_rng(generators: Mapping[str, torch.Generator] | None) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state()}
    cuda_count = 0
    if torch.cuda.is_available():
        cuda_states = torch.cuda.get_rng_state_all()
        cuda_count = len(cuda_states)
        for i, s in enumerate(cuda_states):
            tensors[f"cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    info: dict[str, Any] = {
        "cuda_devices": cuda_count,
        "python": encode_value(random.getstate(), "python", None),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "generators": {},
    }
    for gen_name, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise TypeError(f"generators[{gen_name!r}] must be a torch.Generator, got {type(gen).__name__}")
        tensors[f"generator.{gen_name}"] = gen.get_state()
        info["generators"][gen_name] = {"device": str(gen.device)}
    return tensors, info


def _restore_global_rng(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"].cpu())
    saved_cuda = [tensors[f"cuda.{i}"].cpu() for i in range(int(info.get("cuda_devices", 0)))]
    if saved_cuda and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible != len(saved_cuda):
            logger.warning("Checkpoint has CUDA RNG states for %d devices but %d are visible; "
                           "restoring the first %d", len(saved_cuda), visible, min(visible, len(saved_cuda)))
        for i, state in enumerate(saved_cuda[:visible]):
            torch.cuda.set_rng_state(state, device=i)
    elif saved_cuda:
        logger.warning("Checkpoint has CUDA RNG states but CUDA is not available; they are not restored")
    random.setstate(decode_value(info["python"], None, STATE_FILE))
    np_state = info["numpy"]
    np.random.set_state((np_state["name"], np.array(np_state["keys"], dtype=np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))


def _restore_generators(ckpt: Path, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any],
                        generators: Mapping[str, torch.Generator]) -> None:
    saved = info.get("generators", {})
    missing = [name for name in generators if name not in saved]
    if missing:
        raise CheckpointError(f"{ckpt / RNG_FILE} has no state for generator(s) {missing}; "
                              f"it holds {sorted(saved)}")
    for name, gen in generators.items():
        gen.set_state(tensors[f"generator.{name}"].cpu())


# --------------------------------------------------------------------------- save


def _write_checkpoint_files(tmp_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            scheduler: Any | None, ema: Mapping[str, torch.Tensor] | nn.Module | None,
                            generators: Mapping[str, torch.Generator] | None, extra: dict[str, Any]) -> None:
    """Write every file of a checkpoint into ``tmp_dir`` and fsync them and the directory."""
    state: dict[str, Any] = {"format_version": LOCAL_FORMAT_VERSION, "step": step}
    write_tensor_file(tmp_dir / MODEL_FILE, model.state_dict())
    if ema is not None:
        write_tensor_file(tmp_dir / EMA_FILE, state_of(ema, "ema"))
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        state["optimizer"] = encode_value(optimizer.state_dict(), "", opt_tensors)
        write_tensor_file(tmp_dir / OPTIMIZER_FILE, opt_tensors)
    if scheduler is not None:
        sched_tensors: dict[str, torch.Tensor] = {}
        state["scheduler"] = encode_value(scheduler.state_dict(), "", sched_tensors)
        if sched_tensors:
            write_tensor_file(tmp_dir / SCHEDULER_FILE, sched_tensors)
    rng_tensors, state["rng"] = _capture_rng(generators)
    write_tensor_file(tmp_dir / RNG_FILE, rng_tensors)
    state["extra"] = extra
    state["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in sorted(tmp_dir.iterdir())
    }
    state["state_sha256"] = json_digest(state, "state_sha256")
    write_json_file(tmp_dir / STATE_FILE, state)
    fsync_dir(tmp_dir)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    ema: Mapping[str, torch.Tensor] | nn.Module | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = 2,
) -> Path:
    """Atomically write the full training state as ``<run_dir>/checkpoints/step_<step>``.

    Saves model weights, optional EMA weights, optimizer and LR-scheduler state, the
    global RNG states (torch CPU, CUDA, Python ``random``, NumPy), the given named
    ``generators`` and a JSON-serialisable ``extra`` dict. Afterwards checkpoints older
    than this one are deleted so that at most ``keep_last`` remain (``None`` keeps all).

    Returns the path of the new checkpoint directory. ValueError for a negative step or
    keep_last < 1; CheckpointError if `extra` is not JSON-serialisable.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    try:
        extra_json = json.loads(json.dumps(dict(extra or {}), default=json_default, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"extra must be JSON-serialisable: {err}") from err

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_tmp_dirs(root)
    final_dir = root / step_dir_name(step)
    tmp_dir = tmp_dir_for(final_dir)
    tmp_dir.mkdir()

    try:
        _write_checkpoint_files(tmp_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                ema=ema, generators=generators, extra=extra_json)
    except BaseException:
        # An error (not a kill) should not leave a partial directory until the next save.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    publish(tmp_dir, final_dir)
    prune(root, final_dir, keep_last)
    return final_dir


# --------------------------------------------------------------------------- load


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    ema: dict[str, torch.Tensor] | nn.Module | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_global_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Verify the checkpoint at ``path`` and restore the given objects from it in place.

    ``ema`` may be a module or a dict of tensors (updated in place; an empty dict is
    filled). ``generators`` must all have been saved under the same names. With
    ``restore_global_rng`` the torch/CUDA/Python/NumPy global RNGs are restored too.

    Returns ``{"step": int, "extra": dict}``. CheckpointError if the folder is sharded (load
    it through `CheckpointManager`), corrupted, or lacks a part that was asked for.
    """
    ckpt = Path(path)
    if is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is a sharded (multi-process) checkpoint: load it with "
                              "dancegrpo.checkpoint.CheckpointManager.load (Trainer.resume does)")
    state = verify_checkpoint(ckpt)
    device = str(map_location)

    load_tensors_into(model, read_tensor_file(ckpt / MODEL_FILE, device), ckpt / MODEL_FILE)

    if ema is not None:
        if EMA_FILE not in state["files"]:
            raise CheckpointError(f"{ckpt} has no EMA weights ({EMA_FILE}); pass ema=None")
        load_tensors_into(ema, read_tensor_file(ckpt / EMA_FILE, device), ckpt / EMA_FILE)

    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt} has no optimizer state; pass optimizer=None")
        opt_state = decode_value(state["optimizer"], read_tensor_file(ckpt / OPTIMIZER_FILE, device),
                                 str(ckpt / OPTIMIZER_FILE))
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"optimizer state in {ckpt} does not fit the given optimizer: {err}") from err

    if scheduler is not None:
        if "scheduler" not in state:
            raise CheckpointError(f"{ckpt} has no scheduler state; pass scheduler=None")
        sched_tensors = (read_tensor_file(ckpt / SCHEDULER_FILE, device)
                         if SCHEDULER_FILE in state["files"] else {})
        scheduler.load_state_dict(decode_value(state["scheduler"], sched_tensors, str(ckpt / SCHEDULER_FILE)))

    if restore_global_rng or generators:
        rng_tensors = read_tensor_file(ckpt / RNG_FILE, "cpu")
        if generators:
            _restore_generators(ckpt, rng_tensors, state["rng"], generators)
        if restore_global_rng:
            _restore_global_rng(rng_tensors, state["rng"])

    return {"step": int(state["step"]), "extra": state["extra"]}
