"""How checkpoint files are written and read: tensors, JSON state, integrity checks.

Nothing here knows a file name or a folder layout (that is `layout`); the format modules
(`local`, `sharded`) combine these pieces.

- Tensor files are safetensors. `write_tensor_file` detaches, moves to CPU and makes every
  tensor contiguous, cloning tensors that share storage (tied weights) or view a larger one,
  which safetensors refuses; then fsyncs the file.
- JSON state: `encode_value` turns a state dict (optimizer, scheduler, RNG) into plain JSON with
  small tags for what JSON cannot hold -- ``{"__tuple__": [...]}``, ``{"__items__": [[k, v], ...]}``
  (a dict with non-string keys, e.g. optimizer state keyed by parameter index),
  ``{"__tensor__": "<key>"}`` (the tensor stored under that key of a tensor file) and
  ``{"__ndarray__": [...], "dtype": ...}`` -- and `decode_value` inverts it exactly, so e.g.
  ``optimizer.state_dict()`` comes back as it was and the optimizer continues bit-identically.
- Integrity: `sha256_of` hashes a file; `json_digest` is the SHA-256 of a JSON record without
  its own checksum field and `read_checksummed_json` refuses a record whose checksum does not
  match. `fsync_file` / `fsync_dir` make writes and renames durable (atomic publishing is in
  `layout`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CheckpointError", "fsync_file", "fsync_dir", "sha256_of", "encode_value", "decode_value",
           "json_default", "write_tensor_file", "read_tensor_file", "write_json_file", "json_digest",
           "read_checksummed_json", "state_of", "load_tensors_into"]

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


# --------------------------------------------------------------------------- durability and hashes


def fsync_file(path: Path) -> None:
    """Flush the file at `path` to disk (os.fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames/creations inside the directory `path` durable; a no-op where the platform
    or filesystem cannot fsync a directory (the rename itself is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- JSON encoding


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def encode_value(obj: Any, path: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """Turn `obj` into JSON data; every tensor goes into `tensors` under its dotted `path`
    and is replaced by a ``{"__tensor__": path}`` tag.

    With ``tensors=None`` a one-element tensor becomes a Python number and a larger one is a
    CheckpointError. Raises CheckpointError for a type that cannot be stored.
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
        return {_TAG_TUPLE: [encode_value(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_value(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_value(v, _join(path, k), tensors) for k, v in obj.items()}
        return {_TAG_ITEMS: [[encode_value(k, "", None), encode_value(v, _join(path, k), tensors)]
                             for k, v in obj.items()]}
    raise CheckpointError(f"cannot store {path or 'value'} of type {type(obj).__name__} in a "
                          "checkpoint; use tensors, numbers, strings, lists, tuples or dicts")


def decode_value(obj: Any, tensors: Mapping[str, torch.Tensor] | None, source: str) -> Any:
    """Inverse of `encode_value`; ``{"__tensor__": key}`` tags are looked up in `tensors`
    (CheckpointError naming `source`, the tensor file, when one is missing)."""
    if isinstance(obj, list):
        return [decode_value(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) >= 1 and next(iter(obj)) in _TAGS:
        tag = next(iter(obj))
        if tag == _TAG_TUPLE:
            return tuple(decode_value(v, tensors, source) for v in obj[tag])
        if tag == _TAG_ITEMS:
            return {decode_value(k, None, source): decode_value(v, tensors, source) for k, v in obj[tag]}
        if tag == _TAG_NUMPY:
            return np.array(obj[tag], dtype=np.dtype(obj["dtype"]))
        if tag == _TAG_TENSOR:
            key = obj[tag]
            if tensors is None or key not in tensors:
                raise CheckpointError(f"tensor {key!r} referenced in the checkpoint's JSON state is missing "
                                      f"from {source}")
            return tensors[key]
    return {k: decode_value(v, tensors, source) for k, v in obj.items()}


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for user `extra`: numpy / one-element tensor scalars become
    Python numbers; anything else is a TypeError."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- files


def _savable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU and make contiguous; clone tensors that share storage."""
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


def write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `tensors` (any device; tied or viewed ones are copied) as safetensors, fsynced."""
    save_file(_savable(tensors), str(path))
    fsync_file(path)


def read_tensor_file(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto `map_location`; CheckpointError naming the file if it is
    missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def write_json_file(path: Path, data: Any) -> None:
    """Write `data` as indented JSON (NaN/Infinity allowed), flushed and fsynced."""
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


# --------------------------------------------------------------------------- state dicts


def state_of(obj: nn.Module | Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The tensors to save for `obj`: a module's ``state_dict()`` or a copy of a dict of tensors
    (TypeError naming `what` otherwise)."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{what} must be an nn.Module or a dict of tensors, got {type(obj).__name__}")


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


def load_tensors_into(target: nn.Module | dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                      source: Path) -> None:
    """Copy `loaded` (read from the file `source`) into a module (strict ``load_state_dict``) or a
    dict of tensors (in place; an empty dict is filled). Names and shapes must match exactly:
    CheckpointError listing the missing, unexpected and mismatched keys otherwise."""
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
