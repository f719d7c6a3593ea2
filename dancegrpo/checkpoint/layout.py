"""Where checkpoints live on disk, how they are named, listed, verified, published and pruned.

A run folder holds its checkpoints in ``<run_dir>/checkpoints/step_<NNNNNNNN>/`` (the step,
i.e. the training iteration, zero-padded to 8 digits). A checkpoint folder is in one of two
formats, recognised by its content (`is_sharded_checkpoint`):

Local (single-process) format, written by `dancegrpo.checkpoint.local`:

- ``model.safetensors``      the module's ``state_dict``
- ``ema.safetensors``        EMA weights (optional)
- ``optimizer.safetensors``  every tensor of the optimizer ``state_dict`` (optional)
- ``scheduler.safetensors``  tensors of the LR scheduler state, only if it has any
- ``rng.safetensors``        torch CPU / CUDA RNG states and named generator states
- ``state.json``             ``format_version`` (1), ``step``, the non-tensor parts of the above
                             (``optimizer``, ``scheduler``, ``rng``), user ``extra``, ``files``
                             (size + SHA-256 of each file above) and ``state_sha256`` (a checksum
                             of state.json itself)

Sharded format (torch.distributed.checkpoint), written by `dancegrpo.checkpoint.sharded`:

- ``dcp/``        DCP files: every rank's shards of the model, the optimizer state and the EMA
                  weights, keyed by parameter name (``model.*``, ``optimizer.*``, ``ema.*``)
- ``meta.json``   ``format`` ("dancegrpo-dcp-1"), ``step``, ``world_size``, ``scheduler`` state,
                  ``has_optimizer``, ``has_ema``, user ``extra``, ``files`` (size of every DCP
                  file, by path relative to the checkpoint) and ``meta_sha256`` (its checksum)

Atomicity: a checkpoint is written into ``.tmp-step_<N>``, fsynced, then renamed to
``step_<N>`` (`publish`). A kill at any point leaves the previous checkpoints plus, at most,
either a complete new one or a ``.tmp-*`` leftover, which `list_checkpoints` never lists and
the next save removes (`clean_tmp_dirs`). Pruning renames a doomed folder to
``.tmp-deleting-step_<N>`` before deleting it, so no half-deleted ``step_*`` folder is seen.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .codec import CheckpointError, fsync_dir, read_checksummed_json, sha256_of

__all__ = ["CHECKPOINTS_SUBDIR", "STEP_PREFIX", "TMP_PREFIX", "STATE_FILE", "MODEL_FILE", "EMA_FILE",
           "OPTIMIZER_FILE", "SCHEDULER_FILE", "RNG_FILE", "DCP_DIR", "META_FILE", "LOCAL_FORMAT_VERSION",
           "SHARDED_FORMAT", "checkpoints_dir", "step_dir_name", "step_of", "tmp_dir_for", "list_checkpoints",
           "is_sharded_checkpoint", "looks_like_checkpoint", "verify_local_checkpoint",
           "verify_sharded_checkpoint", "verify_checkpoint", "latest_checkpoint", "clean_tmp_dirs",
           "publish", "prune"]

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Local format.
LOCAL_FORMAT_VERSION = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
RNG_FILE = "rng.safetensors"
# Sharded format.
SHARDED_FORMAT = "dancegrpo-dcp-1"
DCP_DIR = "dcp"
META_FILE = "meta.json"

_STEP_DIR_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- names


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def step_dir_name(step: int) -> str:
    """``step_<step>``, zero-padded to 8 digits: ``step_00000020``."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    """The step of a ``step_<N>`` folder, None for any other name."""
    match = _STEP_DIR_RE.match(path.name)
    return int(match.group(1)) if match else None


def tmp_dir_for(final_dir: Path) -> Path:
    """The folder a checkpoint is written into before `publish` renames it to `final_dir`."""
    return final_dir.parent / f"{TMP_PREFIX}{final_dir.name}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Return the finished ``step_*`` checkpoint directories of ``run_dir``, sorted by step.

    Leftover ``.tmp-*`` directories are never listed. Checkpoints are not verified here;
    use :func:`latest_checkpoint` or :func:`verify_checkpoint` for that.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True if the checkpoint folder `path` is in the sharded format (it holds ``dcp/``)."""
    return (Path(path) / DCP_DIR).is_dir()


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` holds ``state.json`` (local format) or ``dcp/`` (sharded); not verified."""
    return (Path(path) / STATE_FILE).is_file() or is_sharded_checkpoint(path)


# --------------------------------------------------------------------------- verification


def verify_local_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check ``state.json`` (checksum, format version) and every file in its manifest (size,
    then SHA-256). Returns the parsed state; CheckpointError naming the bad file."""
    path = ckpt / STATE_FILE
    state = read_checksummed_json(path, "state_sha256", f"{path} is missing; the checkpoint is incomplete")
    version = state.get("format_version")
    if version != LOCAL_FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; this dancegrpo reads "
                              f"version {LOCAL_FORMAT_VERSION}")
    check_listed_files(ckpt, {name: (meta["size"], meta["sha256"]) for name, meta in state["files"].items()})
    return state


def check_listed_files(ckpt: Path, files: dict[str, tuple[int, str | None]]) -> None:
    """Every file a manifest lists (name -> (size in bytes, SHA-256 or None)) exists with that
    size (and hash). Raises CheckpointError naming the first file that does not."""
    for name, (expected, digest) in files.items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected:
            raise CheckpointError(f"{file} is corrupted: size {size} bytes, expected {expected}")
        if digest is not None and sha256_of(file) != digest:
            raise CheckpointError(f"{file} is corrupted: SHA-256 does not match the manifest")


def verify_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check ``meta.json`` (checksum, format) and the size of every DCP file; returns the metadata."""
    ckpt = Path(path)
    meta_path = ckpt / META_FILE
    meta = read_checksummed_json(meta_path, "meta_sha256",
                                 f"{meta_path} is missing: the sharded checkpoint is incomplete (expected "
                                 f"{ckpt}/{META_FILE} next to {ckpt}/{DCP_DIR}/)")
    if meta.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{meta_path} has format {meta.get('format')!r}; this dancegrpo reads "
                              f"{SHARDED_FORMAT!r}")
    check_listed_files(ckpt, {name: (size, None) for name, size in meta["files"].items()})
    return meta


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify a checkpoint folder of either format; returns its ``state.json`` (local) or
    ``meta.json`` (sharded) content; CheckpointError naming the bad file."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a checkpoint directory")
    if is_sharded_checkpoint(ckpt):
        return verify_sharded_checkpoint(ckpt)
    return verify_local_checkpoint(ckpt)


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


# --------------------------------------------------------------------------- publish and prune


def clean_tmp_dirs(root: Path) -> None:
    """Delete every ``.tmp-*`` leftover of a killed save or prune in the checkpoints folder `root`."""
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        logger.info("Removing leftover partial checkpoint %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically move a fully written checkpoint from `tmp_dir` to `final_dir` (replacing one
    of the same step)."""
    root = final_dir.parent
    if final_dir.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first.
        # A kill between the two renames loses this step's checkpoint only; the older
        # ones are untouched and the aside copy is removed by the next save.
        aside = root / f"{TMP_PREFIX}replaced-{final_dir.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final_dir, aside)
        os.rename(tmp_dir, final_dir)
        fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)
    fsync_dir(root)


def prune(root: Path, just_written: Path, keep_last: int | None) -> None:
    """Delete checkpoints older than `just_written` so that at most `keep_last` remain counting it
    (None keeps all). Newer ones are never deleted; a warning names them."""
    if keep_last is None:
        return
    new_step = step_of(just_written)
    all_dirs = list_checkpoints(root.parent)
    newer = [p for p in all_dirs if (step_of(p) or 0) > new_step]
    if newer:
        logger.warning("Checkpoints newer than step %d exist (%s); latest_checkpoint() will prefer "
                       "them. Delete them if they belong to an abandoned run.", new_step,
                       ", ".join(p.name for p in newer))
    older = [p for p in all_dirs if (step_of(p) or 0) < new_step]
    excess = len(older) - (keep_last - 1)
    for old in older[:max(excess, 0)]:
        # Rename first so a kill mid-delete never leaves a half-deleted step_* directory.
        doomed = root / f"{TMP_PREFIX}deleting-{old.name}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    fsync_dir(root)
