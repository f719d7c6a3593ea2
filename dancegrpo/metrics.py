"""Training metrics: JSONL file, TensorBoard scalars, console lines and plots.

Every ``MetricsLogger.log`` call appends one line ``{"step": ..., "time": ..., **metrics}``
to ``<run_dir>/metrics.jsonl``. Non-finite numbers are written as ``null`` so the file
stays strict JSON. A resumed run calls ``truncate_after(resumed_step)`` so that rows
written after the checkpoint it resumes from are dropped and logged again, leaving the
file with the same rows as an uninterrupted run.

Metric naming conventions understood by ``console_line`` and ``plot_metric``:
``<name>_mean`` / ``_std`` / ``_min`` / ``_max`` form one statistic, ``time/<phase>``
are durations in seconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tqdm

__all__ = ["MetricsLogger", "read_metrics", "plot_metric", "format_number", "METRICS_FILE"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
_RESERVED_KEYS = ("step", "time")
_STAT_SUFFIXES = ("_mean", "_std", "_min", "_max")
_TIME_PREFIX = "time/"

#: Shorter display names used by ``console_line`` (the JSONL/TensorBoard keys are unchanged).
SHORT_NAMES = {"grad_norm": "grad", "clip_fraction": "clip"}
SHORT_TIME_NAMES = {"rollout": "roll", "reward": "rew", "update": "upd"}
#: Keys that ``console_line`` leaves out by default: the iteration is already "it N".
_CONSOLE_HIDDEN = frozenset({"iteration"})

Number = float | int | bool


# --------------------------------------------------------------------------- values


def _to_python(key: str, value: Any) -> Number | str | None:
    """Convert a metric value to a plain Python scalar (0-d/1-element tensors, numpy)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; "
                             "log a scalar (e.g. .mean()) instead")
        return value.detach().cpu().item()
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"metric {key!r} is an array of shape {value.shape}; log a scalar instead")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric {key!r} has unsupported type {type(value).__name__}; "
                    "log numbers, 0-d tensors or strings")


def _json_safe(value: Number | str | None) -> Number | str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_number(value: Any, digits: int = 4) -> str:
    """Compact human format: ints as is, floats with ``digits`` significant digits."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "nan"
    value = float(value)
    if not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return f"{value:.{digits}g}"


def _range_decimals(low: float, high: float) -> int | None:
    """Decimals that make a [low, high] spread visible (ratios near 1 need many)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return None
    return min(8, max(0, math.floor(-math.log10(high - low)) + 1))


def _format_seconds(value: float) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{format_number(value)}s"
    if value < 1:
        return f"{value:.2g}s"
    return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def _display_name(name: str) -> str:
    return SHORT_NAMES.get(name, name)


# --------------------------------------------------------------------------- console line


def _stat_base(key: str, metrics: Mapping[str, Any]) -> str | None:
    """``reward/x`` for ``reward/x_std`` etc. when ``reward/x_mean`` is present."""
    for suffix in _STAT_SUFFIXES:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if base + "_mean" in metrics:
                return base
    return None


def _format_stat(base: str, metrics: Mapping[str, Any]) -> str:
    """``name mean±std [min,max]`` with whichever of std/min/max are present."""
    mean = metrics[base + "_mean"]
    std, low, high = (metrics.get(base + suffix) for suffix in ("_std", "_min", "_max"))
    has_range = isinstance(low, (int, float)) and isinstance(high, (int, float))
    decimals = _range_decimals(float(low), float(high)) if has_range else None
    if decimals is not None and isinstance(mean, (int, float)) and math.isfinite(mean):
        text = f"{mean:.{decimals}f}"
        bounds = f"[{low:.{decimals}f},{high:.{decimals}f}]"
    else:
        text = format_number(mean, 3)
        bounds = f"[{format_number(low)},{format_number(high)}]" if has_range else ""
    if std is not None:
        text += f"±{format_number(std, 3)}"
    return " ".join(part for part in (_display_name(base), text, bounds) if part)


def _console_line(step: int, metrics: Mapping[str, Any], keys: Sequence[str] | None) -> str:
    if keys is None:
        names = [k for k in metrics if k not in _CONSOLE_HIDDEN]
    else:
        names = []
        for name in keys:
            if name == "time":
                names.extend(k for k in metrics if k.startswith(_TIME_PREFIX))
            elif name in metrics:
                names.append(name)
            elif name + "_mean" in metrics:
                names.append(name + "_mean")
    parts, timings, done = [f"it {step}"], [], set()
    for key in names:
        if key in done:
            continue
        value = metrics[key]
        if key.startswith(_TIME_PREFIX):
            phase = key[len(_TIME_PREFIX):]
            timings.append(f"{SHORT_TIME_NAMES.get(phase, phase)} {_format_seconds(value)}")
            done.add(key)
            continue
        base = _stat_base(key, metrics)
        if base is not None and (keys is None or key == base + "_mean" or base in keys):
            done.update(base + s for s in _STAT_SUFFIXES)
            parts.append(_format_stat(base, metrics))
            continue
        done.add(key)
        parts.append(f"{_display_name(key)} {format_number(value)}")
    if timings:
        parts.append("t " + " ".join(timings))
    return " | ".join(parts)


# --------------------------------------------------------------------------- JSONL helpers


def _metrics_path(run_dir_or_file: str | os.PathLike) -> Path:
    path = Path(run_dir_or_file)
    return path if path.suffix == ".jsonl" else path / METRICS_FILE


def _parse_lines(path: Path) -> list[dict]:
    """Rows of a JSONL file; an unparsable line (a write cut off by a kill) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not valid JSON (an interrupted write?); skipping it", path, number)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Return the rows of ``<run_dir>/metrics.jsonl`` (``null`` values come back as None).

    ``run_dir`` may also be the path of a ``.jsonl`` file. A missing file gives ``[]``.
    """
    path = _metrics_path(run_dir)
    return _parse_lines(path) if path.is_file() else []


# --------------------------------------------------------------------------- logger


class MetricsLogger:
    """Write per-step metrics to JSONL, TensorBoard and (optionally) the console.

    With ``resume=False`` an existing ``metrics.jsonl`` is replaced; with ``resume=True``
    it is appended to, and the caller should call :meth:`truncate_after` with the step
    it resumed from.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, console: bool = True,
                 resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.console = console
        self._use_tensorboard = tensorboard
        self._writer = None
        self._purge_step: int | None = None
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")

    # -- TensorBoard is opened lazily so that a resume can first set its purge step.
    def _tensorboard_writer(self):
        if not self._use_tensorboard:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                logger.warning("TensorBoard logging disabled: %s (pip install tensorboard)", err)
                self._use_tensorboard = False
                return None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_SUBDIR),
                                         purge_step=self._purge_step)
        return self._writer

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row for ``step``; also TensorBoard scalars and a console line."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {step!r}")
        step = int(step)
        clash = [k for k in _RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the row's own fields; rename them")
        values = {key: _to_python(key, value) for key, value in metrics.items()}
        row = {"step": step, "time": time.time(), **{k: _json_safe(v) for k, v in values.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in values.items():
                if isinstance(value, (bool, int, float)):
                    writer.add_scalar(key, float(value), step)
        if self.console:
            tqdm.tqdm.write(self.console_line(step, values))

    def console_line(self, step: int, metrics: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
        """One compact line, e.g. ``it 12 | reward/toy 0.512±0.103 | loss -0.0012 | t roll 3.1s``.

        ``<name>_mean`` is shown with its ``_std`` as ``mean±std`` and with ``_min``/``_max``
        as ``mean [min,max]``; ``time/*`` durations are gathered at the end. ``keys``
        selects and orders what is shown (base names such as ``"reward/toy"``, full keys,
        or ``"time"`` for all durations); by default everything is shown.
        """
        values = {key: _to_python(key, value) for key, value in metrics.items()}
        return _console_line(step, values, keys)

    def truncate_after(self, step: int) -> int:
        """Drop rows with a step greater than ``step``; return how many were dropped.

        Called on resume with the checkpoint's step, so that the rows logged after that
        checkpoint by the interrupted run are replaced by the resumed run's rows. Also
        makes TensorBoard hide the interrupted run's scalars past ``step``.
        """
        self._file.close()
        rows = _parse_lines(self.path) if self.path.exists() else []
        kept = [row for row in rows if isinstance(row.get("step"), int) and row["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

        self._purge_step = step + 1
        if self._writer is not None:  # reopen so the purge marker is written
            self._writer.close()
            self._writer = None
        return len(rows) - len(kept)

    def flush(self) -> None:
        self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------- plots


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points, ignoring NaNs (NaN where none are finite)."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    n = counts[idx] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[idx] - sums[start]) / np.maximum(n, 1), np.nan)


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def plot_metric(run_dir_or_rows: str | os.PathLike | Sequence[Mapping[str, Any]], key: str,
                out_png: str | os.PathLike, smooth: int = 1, title: str | None = None) -> Path:
    """Plot ``key`` against step as a PNG; returns the PNG path.

    ``smooth > 1`` overlays a trailing moving average over that many points. A shaded
    ±std band is drawn when rows also hold ``<key>_std`` (or ``<name>_std`` for a
    ``<name>_mean`` key).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    if isinstance(run_dir_or_rows, (str, os.PathLike)):
        rows = read_metrics(run_dir_or_rows)
    else:
        rows = list(run_dir_or_rows)
    rows = sorted((r for r in rows if key in r), key=lambda r: r["step"])
    if not rows:
        raise ValueError(f"no rows contain metric {key!r}; check the key name or the run directory")
    std_key = next((k for k in (key + "_std", key.removesuffix("_mean") + "_std")
                    if k != key and any(k in r for r in rows)), None)

    steps = np.array([r["step"] for r in rows], dtype=float)
    values = np.array([_as_float(r[key]) for r in rows])
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if std_key is not None:
        std = np.array([_as_float(r.get(std_key)) for r in rows])
        ax.fill_between(steps, values - std, values + std, alpha=0.2, color="C0", linewidth=0,
                        label=f"±{std_key}")
    ax.plot(steps, values, color="C0", alpha=0.45 if smooth > 1 else 1.0, linewidth=1,
            marker="." if len(rows) < 50 else None, label=key)
    if smooth > 1:
        ax.plot(steps, _moving_average(values, smooth), color="C1", linewidth=2,
                label=f"moving average ({smooth})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
