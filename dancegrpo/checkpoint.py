"""Atomic, verifiable training checkpoints (safetensors + JSON).

Layout of one checkpoint, ``<run_dir>/checkpoints/step_<NNNNNNNN>/``:

- ``model.safetensors``      the module's ``state_dict``
- ``ema.safetensors``        EMA weights (optional)
- ``optimizer.safetensors``  every tensor of the optimizer ``state_dict`` (optional)
- ``scheduler.safetensors``  tensors of the LR scheduler state, only if it has any
- ``rng.safetensors``        torch CPU / CUDA RNG states and named generator states
- ``state.json``             step, the non-tensor parts of the above, user ``extra``,
                             format version and a manifest (size + SHA-256 of each file)

Non-tensor state is stored as JSON with small tags (tuples, int-keyed dicts, tensor
placeholders) so that e.g. ``optimizer.state_dict()`` comes back exactly as it was and
the optimizer continues bit-identically.

Atomicity: a checkpoint is written into ``.tmp-step_<N>``, every file and the directory
are fsynced, then the directory is renamed to ``step_<N>`` and the parent fsynced. A
kill at any point leaves the previous checkpoints plus, at most, either a complete new
one or a ``.tmp-*`` leftover, which readers ignore and the next save removes.

Only one process (e.g. rank 0) should save into a run directory at a time.

Multi-process runs write sharded checkpoints (dancegrpo.distributed.dist_checkpoint) under the
same ``step_<N>`` names; ``latest_checkpoint`` and ``verify_checkpoint`` accept both formats.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
RNG_FILE = "rng.safetensors"

_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
_MAX_LISTED_KEYS = 5
_HASH_CHUNK = 1 << 20

# JSON tags for values plain JSON cannot represent faithfully.
_TAG_TUPLE = "__tuple__"
_TAG_ITEMS = "__items__"  # dict whose keys are not all strings (optimizer state is keyed by int)
_TAG_TENSOR = "__tensor__"
_TAG_NUMPY = "__ndarray__"
_TAGS = (_TAG_TUPLE, _TAG_ITEMS, _TAG_TENSOR, _TAG_NUMPY)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or does not fit the objects it is loaded into."""


# --------------------------------------------------------------------------- paths


def _checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def _step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Return the finished ``step_*`` checkpoint directories of ``run_dir``, sorted by step.

    Leftover ``.tmp-*`` directories are never listed. Checkpoints are not verified here;
    use :func:`latest_checkpoint` or :func:`verify_checkpoint` for that.
    """
    root = _checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Return the newest checkpoint of ``run_dir`` that passes verification, or None.

    Checkpoints that fail verification (truncated or altered files) are skipped with a
    logged warning, so a run can resume from the last good one.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            logger.warning("Skipping invalid checkpoint %s: %s", path, err)
            continue
        return path
    return None


# --------------------------------------------------------------------------- fsync helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes renames/creations inside `path` durable. Not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- JSON encoding


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """Turn ``obj`` into JSON data; tensors go into ``tensors`` under their ``path``.

    With ``tensors=None`` a tensor is an error (used for user ``extra``).
    """
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            if obj.numel() == 1:
                return obj.item()
            raise CheckpointError(f"{path or 'value'} is a tensor of shape {tuple(obj.shape)}; "
                                  "convert it to a list or a scalar before saving it in `extra`")
        tensors[path] = obj
        return {_TAG_TENSOR: path}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj  # json writes NaN/Infinity and reads them back; repr round-trips exactly
    if isinstance(obj, np.ndarray):
        return {_TAG_NUMPY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TAG_TUPLE: [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        return {_TAG_ITEMS: [[_encode(k, "", None), _encode(v, _join(path, k), tensors)]
                             for k, v in obj.items()]}
    raise CheckpointError(f"cannot store {path or 'value'} of type {type(obj).__name__} in a "
                          "checkpoint; use tensors, numbers, strings, lists, tuples or dicts")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor] | None, source: str) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) >= 1 and next(iter(obj)) in _TAGS:
        tag = next(iter(obj))
        if tag == _TAG_TUPLE:
            return tuple(_decode(v, tensors, source) for v in obj[tag])
        if tag == _TAG_ITEMS:
            return {_decode(k, None, source): _decode(v, tensors, source) for k, v in obj[tag]}
        if tag == _TAG_NUMPY:
            return np.array(obj[tag], dtype=np.dtype(obj["dtype"]))
        if tag == _TAG_TENSOR:
            key = obj[tag]
            if tensors is None or key not in tensors:
                raise CheckpointError(f"tensor {key!r} referenced in {STATE_FILE} is missing "
                                      f"from {source}")
            return tensors[key]
    return {k: _decode(v, tensors, source) for k, v in obj.items()}


def _json_default(value: Any) -> Any:
    # Convenience for user `extra`: numpy / 0-d tensor scalars become Python numbers.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- tensor files


def _savable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU and make contiguous; clone tensors that share storage.

    safetensors refuses tensors that alias each other (tied weights) or that are views
    into a larger storage, so those are saved as independent copies.
    """
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name!r} is a {type(value).__name__}, expected a tensor")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.numel() == 0:
            out[name] = t.contiguous().clone()
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        covers_storage = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
        if ptr in seen_storages or not covers_storage:
            t = t.contiguous().clone()
        else:
            seen_storages.add(ptr)
        out[name] = t
    return out


def _write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file(_savable(tensors), str(path))
    _fsync_file(path)


def _write_json_file(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())


def json_digest(record: Mapping[str, Any], digest_key: str) -> str:
    """SHA-256 of a JSON record without its own checksum field `digest_key`."""
    body = {k: v for k, v in record.items() if k != digest_key}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_checksummed_json(path: Path, digest_key: str, missing: str) -> dict[str, Any]:
    """Load a JSON record written with `json_digest` under `digest_key`; CheckpointError
    (`missing` when absent) if it is absent, unreadable or does not match its checksum."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable or corrupted: {err}") from err
    if not isinstance(record, dict) or record.get(digest_key) != json_digest(record, digest_key):
        raise CheckpointError(f"{path} is corrupted (its checksum does not match its content)")
    return record


def _read_tensor_file(ckpt: Path, name: str, map_location: str) -> dict[str, torch.Tensor]:
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


# --------------------------------------------------------------------------- state capture


def _module_or_dict_state(obj: nn.Module | Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{what} must be an nn.Module or a dict of tensors, got {type(obj).__name__}")


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
        "python": _encode(random.getstate(), "python", None),
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
    random.setstate(_decode(info["python"], None, STATE_FILE))
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


# --------------------------------------------------------------------------- key checks


def _summarise(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED_KEYS])
    extra = len(names) - _MAX_LISTED_KEYS
    return f"{shown} and {extra} more" if extra > 0 else shown


def _check_keys(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: Path) -> None:
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = sorted(
        f"{k} (checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarise(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the given module: " + "; ".join(problems)
                              + ". Build the model with the same configuration as the saved run.")


def _load_into(target: nn.Module | dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: Path) -> None:
    if isinstance(target, nn.Module):
        _check_keys(target.state_dict(), loaded, source)
        target.load_state_dict(loaded, strict=True)
        return
    if not isinstance(target, dict):
        raise TypeError(f"cannot load {source.name} into a {type(target).__name__}; "
                        "pass an nn.Module or a dict of tensors")
    if not target:  # an empty dict is filled with the saved tensors
        target.update(loaded)
        return
    _check_keys(target, loaded, source)
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(loaded[name])


# --------------------------------------------------------------------------- save


def _clean_tmp_dirs(root: Path) -> None:
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        logger.info("Removing leftover partial checkpoint %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically move a fully written checkpoint into place."""
    root = final_dir.parent
    if final_dir.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first.
        # A kill between the two renames loses this step's checkpoint only; the older
        # ones are untouched and the aside copy is removed by the next save.
        aside = root / f"{TMP_PREFIX}replaced-{final_dir.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final_dir, aside)
        os.rename(tmp_dir, final_dir)
        _fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)
    _fsync_dir(root)


def _prune(root: Path, just_written: Path, keep_last: int | None) -> None:
    """Delete checkpoints older than the one just written beyond the newest ``keep_last``."""
    if keep_last is None:
        return
    new_step = _step_of(just_written)
    all_dirs = list_checkpoints(root.parent)
    newer = [p for p in all_dirs if (_step_of(p) or 0) > new_step]
    if newer:
        logger.warning("Checkpoints newer than step %d exist (%s); latest_checkpoint() will prefer "
                       "them. Delete them if they belong to an abandoned run.", new_step,
                       ", ".join(p.name for p in newer))
    older = [p for p in all_dirs if (_step_of(p) or 0) < new_step]
    excess = len(older) - (keep_last - 1)
    for old in older[:max(excess, 0)]:
        # Rename first so a kill mid-delete never leaves a half-deleted step_* directory.
        doomed = root / f"{TMP_PREFIX}deleting-{old.name}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    _fsync_dir(root)


def _write_checkpoint_files(
    tmp_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    ema: Mapping[str, torch.Tensor] | nn.Module | None,
    generators: Mapping[str, torch.Generator] | None,
    extra: dict[str, Any],
) -> None:
    """Write every file of a checkpoint into ``tmp_dir`` and fsync them and the directory."""
    state: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": step}
    _write_tensor_file(tmp_dir / MODEL_FILE, model.state_dict())
    if ema is not None:
        _write_tensor_file(tmp_dir / EMA_FILE, _module_or_dict_state(ema, "ema"))
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        state["optimizer"] = _encode(optimizer.state_dict(), "", opt_tensors)
        _write_tensor_file(tmp_dir / OPTIMIZER_FILE, opt_tensors)
    if scheduler is not None:
        sched_tensors: dict[str, torch.Tensor] = {}
        state["scheduler"] = _encode(scheduler.state_dict(), "", sched_tensors)
        if sched_tensors:
            _write_tensor_file(tmp_dir / SCHEDULER_FILE, sched_tensors)
    rng_tensors, state["rng"] = _capture_rng(generators)
    _write_tensor_file(tmp_dir / RNG_FILE, rng_tensors)
    state["extra"] = extra
    state["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256_of(p)} for p in sorted(tmp_dir.iterdir())
    }
    state["state_sha256"] = json_digest(state, "state_sha256")
    _write_json_file(tmp_dir / STATE_FILE, state)
    _fsync_dir(tmp_dir)


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

    Returns the path of the new checkpoint directory.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    try:
        extra_json = json.loads(json.dumps(dict(extra or {}), default=_json_default, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"extra must be JSON-serialisable: {err}") from err

    root = _checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_tmp_dirs(root)
    final_dir = root / _step_dir_name(step)
    tmp_dir = root / f"{TMP_PREFIX}{final_dir.name}"
    tmp_dir.mkdir()

    try:
        _write_checkpoint_files(tmp_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                ema=ema, generators=generators, extra=extra_json)
    except BaseException:
        # An error (not a kill) should not leave a partial directory until the next save.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _publish(tmp_dir, final_dir)
    _prune(root, final_dir, keep_last)
    return final_dir


# --------------------------------------------------------------------------- verify / load


def _read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    state = read_checksummed_json(path, "state_sha256", f"{path} is missing; the checkpoint is incomplete")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; this dancegrpo reads "
                              f"version {FORMAT_VERSION}")
    return state


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check ``state.json`` and every file in its manifest (size, then SHA-256).

    Returns the parsed state; raises :class:`CheckpointError` naming the bad file.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a checkpoint directory")
    from .distributed.dist_checkpoint import is_sharded_checkpoint, verify_sharded_checkpoint
    if is_sharded_checkpoint(ckpt):
        return verify_sharded_checkpoint(ckpt)
    state = _read_state(ckpt)
    for name, meta in state["files"].items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{file} is corrupted: size {size} bytes, expected {meta['size']}")
        if _sha256_of(file) != meta["sha256"]:
            raise CheckpointError(f"{file} is corrupted: SHA-256 does not match the manifest")
    return state


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

    Returns ``{"step": int, "extra": dict}``.
    """
    ckpt = Path(path)
    from .distributed.dist_checkpoint import is_sharded_checkpoint
    if is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is a sharded (multi-process) checkpoint: load it with "
                              "dancegrpo.distributed.dist_checkpoint.load_sharded_checkpoint (Trainer.resume does)")
    state = verify_checkpoint(ckpt)
    device = str(map_location)

    model_tensors = _read_tensor_file(ckpt, MODEL_FILE, device)
    _load_into(model, model_tensors, ckpt / MODEL_FILE)

    if ema is not None:
        if EMA_FILE not in state["files"]:
            raise CheckpointError(f"{ckpt} has no EMA weights ({EMA_FILE}); pass ema=None")
        _load_into(ema, _read_tensor_file(ckpt, EMA_FILE, device), ckpt / EMA_FILE)

    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt} has no optimizer state; pass optimizer=None")
        opt_state = _decode(state["optimizer"], _read_tensor_file(ckpt, OPTIMIZER_FILE, device),
                            str(ckpt / OPTIMIZER_FILE))
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"optimizer state in {ckpt} does not fit the given optimizer: {err}") from err

    if scheduler is not None:
        if "scheduler" not in state:
            raise CheckpointError(f"{ckpt} has no scheduler state; pass scheduler=None")
        sched_tensors = (_read_tensor_file(ckpt, SCHEDULER_FILE, device)
                         if SCHEDULER_FILE in state["files"] else {})
        scheduler.load_state_dict(_decode(state["scheduler"], sched_tensors, str(ckpt / SCHEDULER_FILE)))

    if restore_global_rng or generators:
        rng_tensors = _read_tensor_file(ckpt, RNG_FILE, "cpu")
        if generators:
            _restore_generators(ckpt, rng_tensors, state["rng"], generators)
        if restore_global_rng:
            _restore_global_rng(rng_tensors, state["rng"])

    return {"step": int(state["step"]), "extra": state["extra"]}

