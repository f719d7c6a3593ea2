"""What a run folder holds, and whether a run may start, resume or overwrite there.

A run never overwrites another run's files without being told to, and `resume` never
silently starts over:

- `resume=False` (`dancegrpo train`): a new run. Refused if the folder already holds a run
  (checkpoints, `metrics.jsonl` rows or `final_model/`), unless `overwrite=True`
  (`--overwrite`), which deletes that run's outputs first.
- `resume=True` (`--resume`): continue from the newest valid checkpoint. Refused, naming the
  folder and what was found there, when there is none (no folder, no checkpoints, or every
  checkpoint invalid).
- `resume="auto"` (`--resume-or-start`, for job schedulers and `torchrun --max-restarts`,
  where one command must both start and restart a run): resume from the newest valid
  checkpoint; start a new run if the folder holds no run yet, or only the logs of this same
  run (the folder's `config.yaml` equals this run's) cut short before its first checkpoint;
  refused otherwise (checkpoints that are all invalid, or another run's files).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CHECKPOINTS_SUBDIR, CheckpointError, list_checkpoints, verify_checkpoint

__all__ = ["RunFolderError", "RunFolder", "inspect_run_folder", "prepare_run_folder", "RUN_OUTPUTS"]

#: What a run writes into its folder besides config.yaml; `--overwrite` deletes these.
RUN_OUTPUTS = (CHECKPOINTS_SUBDIR, "metrics.jsonl", "tensorboard", "final_model", "eval", "summary.json",
               "reward_curve.png", "samples_before_after.png")
_LISTED_PROBLEMS = 3


class RunFolderError(ValueError):
    """The run folder's content does not allow what was asked (start, resume, overwrite)."""


@dataclass
class RunFolder:
    """A run folder's content as far as starting or resuming a run cares."""

    path: Path
    exists: bool
    checkpoints: list[Path] = field(default_factory=list)               # every step_* folder, oldest first
    latest: Path | None = None                                          # the newest that verifies (if verified)
    invalid: list[tuple[Path, str]] = field(default_factory=list)       # newer ones that do not: (path, why)
    verified: bool = False
    metrics_rows: int = 0                                               # lines of metrics.jsonl
    has_final_model: bool = False

    @property
    def holds_run(self) -> bool:
        """True if a run has written results here (checkpoints, metric rows or a final model)."""
        return bool(self.checkpoints or self.metrics_rows or self.has_final_model)

    def describe(self) -> str:
        """One phrase: what is there, e.g. "4 checkpoints, all invalid (step_00000004: ...)"."""
        if not self.exists:
            return "the folder does not exist"
        found = []
        total = len(self.checkpoints)
        if total == 0:
            found.append("no checkpoints")
        elif not self.verified:
            found.append(f"{_count(total, 'checkpoint')} (newest: {self.checkpoints[-1].name})")
        elif self.latest is None:
            found.append(f"{_count(total, 'checkpoint')}, {'all' if total > 1 else 'it is'} invalid "
                         f"({_problems(self.invalid)})")
        else:
            bad = f"; {len(self.invalid)} newer invalid: {_problems(self.invalid)}" if self.invalid else ""
            found.append(f"{_count(total, 'checkpoint')} (newest valid: {self.latest.name}{bad})")
        if self.metrics_rows:
            found.append(f"metrics.jsonl with {_count(self.metrics_rows, 'row')}")
        if self.has_final_model:
            found.append("final_model/")
        return ", ".join(found)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _problems(invalid: list[tuple[Path, str]]) -> str:
    shown = "; ".join(f"{p.name}: {why}" for p, why in invalid[:_LISTED_PROBLEMS])
    rest = len(invalid) - _LISTED_PROBLEMS
    return shown + (f"; and {rest} more" if rest > 0 else "")


def inspect_run_folder(run_dir: str | os.PathLike, verify: bool = True) -> RunFolder:
    """Read what `run_dir` holds. With `verify`, checkpoints are verified newest first (sizes and
    SHA-256 of their files, as `checkpoint.latest_checkpoint` does) down to the first valid one."""
    path = Path(run_dir)
    folder = RunFolder(path, path.is_dir(), verified=verify)
    if not folder.exists:
        return folder
    folder.checkpoints = list_checkpoints(path)
    for ckpt in reversed(folder.checkpoints if verify else []):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as err:
            folder.invalid.append((ckpt, _first_line(str(err))))
            continue
        folder.latest = ckpt
        break
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, "rb") as f:
            folder.metrics_rows = sum(1 for line in f if line.strip())
    folder.has_final_model = (path / "final_model").exists()
    return folder


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _same_config(path: Path, config: dict | None) -> bool:
    """True if the folder's config.yaml holds `config` (this run's resolved config)."""
    import yaml
    saved = path / "config.yaml"
    if config is None or not saved.is_file():
        return False
    try:
        return yaml.safe_load(saved.read_text(encoding="utf-8")) == json.loads(json.dumps(config))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def prepare_run_folder(run_dir: str | os.PathLike, resume: bool | str = False, overwrite: bool = False,
                       config: dict | None = None, delete: bool = True) -> Path | None:
    """Decide, before any work, whether this run starts fresh or resumes; returns the
    checkpoint to resume from, or None to start a new run.

    `resume`: False (a new run), True (must resume) or "auto" (resume if possible, see the
    module docstring). `overwrite` (only with resume=False) deletes the outputs of a run
    already in the folder (`RUN_OUTPUTS`) when `delete` is true (under torchrun only rank 0
    deletes). `config`: this run's resolved config as a plain mapping, which lets "auto"
    recognise its own earlier attempt.

    Raises RunFolderError naming the folder, what it holds and what to do.
    """
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume = {resume!r} is not allowed: use False (a new run), True (continue the run in "
                         "the folder) or 'auto' (continue if there is a checkpoint, else start)")
    if overwrite and resume:
        raise ValueError("overwrite deletes the run in the folder and resume continues it: give one of them")
    folder = inspect_run_folder(run_dir, verify=bool(resume))
    where = f"run folder {str(folder.path)!r}"
    if resume is True:
        if folder.latest is None:
            raise RunFolderError(
                f"--resume: nothing to resume in {where}: {folder.describe()}. Check run.output_dir "
                "(--output-dir); to start a new run there, drop --resume"
                + (" and add --overwrite (this deletes what is there)" if folder.holds_run else ""))
        return folder.latest
    if resume == "auto":
        if folder.latest is not None:
            return folder.latest
        if folder.checkpoints:
            raise RunFolderError(
                f"--resume-or-start: {where} holds {folder.describe()}; refusing to start over on top of "
                "them. Repair or move them, or start a new run with --overwrite (this deletes them)")
        if folder.holds_run and not _same_config(folder.path, config):
            raise RunFolderError(
                f"--resume-or-start: {where} holds another run's files ({folder.describe()}, no checkpoint) "
                "with a different config.yaml; use another --output-dir, or --overwrite to delete them")
        if folder.holds_run and delete:  # this run's own attempt, cut short before its first checkpoint
            _delete_outputs(folder.path)
        return None
    if folder.holds_run:
        if not overwrite:
            raise RunFolderError(
                f"{where} already holds a run ({folder.describe()}): pass --resume to continue it, --overwrite "
                "to delete it and start again, or choose another folder with --output-dir (Python: "
                "Trainer.train(resume=True) or train(overwrite=True))")
        if delete:
            _delete_outputs(folder.path)
    return None


def _delete_outputs(path: Path) -> None:
    """Delete what a run wrote into `path` (`RUN_OUTPUTS`); other files are left alone."""
    for name in RUN_OUTPUTS:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
