"""`dancegrpo eval`: base and fine-tuned checkpoints side by side on held-out prompts.

Every row comes from `EvalModel.evaluate()` (the deterministic ODE sampler, EMA weights when
the config keeps an EMA; the trainer evaluates through the same class) on one model, loaded in
turn with each checkpoint's weights. The initial noise of a (prompt, seed) pair depends only on
the run seed, the prompt and the seed index, never on the checkpoint, so every row is scored on
the same noise: a paired comparison.

Outputs in the chosen folder: `eval.csv` (one row per model), `eval.json` (also the
per-seed values and the prompts), `eval.png` (a bar chart per metric) and, with the base
and at least one checkpoint, `samples_base_vs_last.png` (the base next to the last
checkpoint, seed 0).
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import STATE_FILE, latest_checkpoint, looks_like_checkpoint
from ..data import load_prompts
from .heldout import EvalModel
from .report import save_before_after_grid

log = logging.getLogger(__name__)

CHECKPOINT_LAYOUT = ("a run folder holding checkpoints/step_<N>/ (its newest valid checkpoint is used) or one "
                     f"checkpoint folder holding {STATE_FILE} and model.safetensors (or, from a multi-process "
                     "run, dcp/ and meta.json)")


@dataclass
class EvalRow:
    """The held-out metrics of one model (the base or a checkpoint)."""

    label: str
    step: int | None                          # training iteration of the checkpoint; None for the base
    metrics: dict[str, float]                 # metric -> mean over seeds
    per_seed: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EvalReport:
    rows: list[EvalRow]
    prompts: list[str]
    seeds: int
    table: str                                # the console table
    files: dict[str, Path]                    # what was written: csv, json, plot[, samples]


# --------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its newest valid checkpoint) or one checkpoint folder -> the checkpoint folder."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: expected {CHECKPOINT_LAYOUT}")
    if (given / "checkpoints").is_dir():
        newest = latest_checkpoint(given)
        if newest is None:
            raise FileNotFoundError(f"run folder {str(path)!r} has no complete, valid checkpoint under "
                                    f"{given / 'checkpoints'} (a run writes one every trainer.checkpoint_every "
                                    "iterations)")
        return newest
    if not looks_like_checkpoint(given):
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint: expected {CHECKPOINT_LAYOUT}. An exported "
                                "model folder (e.g. <run>/final_model) is a base model: pass it as "
                                "--set model.path=<folder> instead")
    return given


def load_checkpoint_weights(model: EvalModel, path: str | Path) -> int:
    """Load a run's newest valid checkpoint (or one checkpoint folder) into `model` for evaluation
    (see `EvalModel.load_checkpoint`); returns the checkpoint's training iteration."""
    return model.load_checkpoint(resolve_checkpoint(path))


def checkpoint_label(ckpt: Path) -> str:
    """`<run folder>/step_<N>` for a checkpoint inside a run, else the folder name."""
    return f"{ckpt.parent.parent.name}/{ckpt.name}" if ckpt.parent.name == "checkpoints" else ckpt.name


# --------------------------------------------------------------------------- evaluation

def evaluate_model(model: EvalModel, prompts: list[str], seeds: int) -> tuple[dict[str, float],
                                                                             list[dict[str, float]], torch.Tensor]:
    """`model.evaluate()` for each seed index; returns (mean over seeds, per seed, seed-0 images).

    The rewards' metadata is also reported per tag (e.g. `toy_geneval_accuracy/<kind>`): an
    overall accuracy alone hides which kinds of prompt moved."""
    per_seed, images = [], None
    for s in range(seeds):
        result = model.evaluate(prompts=prompts, return_images=s == 0, by_tag=True, seed_index=s)
        if s == 0:
            images = result.pop("images")
        per_seed.append({key.removeprefix("eval/"): value for key, value in result.items()})
    names = list(dict.fromkeys(name for row in per_seed for name in row))
    mean = {name: _mean([row.get(name, math.nan) for row in per_seed]) for name in names}
    return mean, per_seed, images


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def compare(model: EvalModel, checkpoints: Sequence[str | Path], prompts: list[str], include_base: bool = True,
            seeds: int = 1) -> tuple[list[EvalRow], dict[str, torch.Tensor]]:
    """Evaluate the base (unless `include_base` is False) and each checkpoint on the same noise.

    The base must be the model's weights as built (it is evaluated before any checkpoint is
    loaded). Returns the rows and each row's seed-0 images by label.
    """
    if seeds < 1:
        raise ValueError(f"seeds = {seeds}: must be >= 1 (noise draws per prompt)")
    if not prompts:
        raise ValueError("no held-out prompts: pass --prompts <file or toy:eval> or set data.eval_prompts")
    if not include_base and not checkpoints:
        raise ValueError("nothing to evaluate: give --checkpoint, or keep the base model (drop --no-base)")
    resolved = [resolve_checkpoint(c) for c in checkpoints]  # every path checked before any sampling
    labels = _unique([checkpoint_label(c) for c in resolved])
    rows, images = [], {}
    if include_base:
        mean, per_seed, images["base"] = evaluate_model(model, prompts, seeds)
        rows.append(EvalRow("base", None, mean, per_seed))
    for label, ckpt in zip(labels, resolved):
        step = model.load_checkpoint(ckpt)
        mean, per_seed, images[label] = evaluate_model(model, prompts, seeds)
        rows.append(EvalRow(label, step, mean, per_seed))
    return rows, images


def _unique(labels: list[str]) -> list[str]:
    """The same checkpoint given twice gets ` (2)`: labels key the rows and their images."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


# --------------------------------------------------------------------------- outputs

def metric_names(rows: list[EvalRow]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row.metrics))


def write_csv(rows: list[EvalRow], path: str | Path) -> Path:
    """One row per model: checkpoint, step, then each metric (mean over seeds)."""
    names = metric_names(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "step", *names])
        for row in rows:
            writer.writerow([row.label, "" if row.step is None else row.step,
                             *(repr(row.metrics.get(n, math.nan)) for n in names)])
    return Path(path)


def format_table(rows: list[EvalRow], prompts: int, seeds: int) -> str:
    """A fixed-width console table, one line per model."""
    names = metric_names(rows)
    header = ["checkpoint", "step", *names]
    body = [[row.label, "-" if row.step is None else str(row.step), *(f"{row.metrics.get(n, math.nan):.4f}"
                                                                     for n in names)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [f"held-out evaluation: {prompts} prompts x {seeds} seed(s), ODE sampler, same noise for every row",
             fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*line) for line in body])


def plot_metrics(rows: list[EvalRow], path: str | Path) -> Path:
    """A bar chart per metric, one bar per model (error bars: std over seeds when there are several)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(rows)
    fig, axes = plt.subplots(1, len(names), figsize=(max(3.0, 0.9 * len(rows) + 1.5) * len(names), 3.6),
                             squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for ax, name in zip(axes[0], names):
        values = [row.metrics.get(name, math.nan) for row in rows]
        spread = [_std([s.get(name, math.nan) for s in row.per_seed]) for row in rows]
        bars = ax.bar(range(len(rows)), values, color=colors,
                      yerr=spread if any(v > 0 for v in spread) else None, capsize=3)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(range(len(rows)), [row.label for row in rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.margins(y=0.15)
        tops = [v + e for v, e in zip(values, spread) if math.isfinite(v)]
        if tops and min(v for v in values if math.isfinite(v)) >= 0:  # bars from zero; a visible axis if all are 0
            ax.set_ylim(0, 1.15 * max(tops) if max(tops) > 0 else 1.0)
    fig.suptitle("held-out evaluation (ODE sampler, same noise per row)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _std(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return 0.0
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def _json_numbers(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN (no finite score) as null: strict JSON, as metrics.jsonl writes it."""
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def write_outputs(rows: list[EvalRow], images: dict[str, torch.Tensor], prompts: list[str], seeds: int,
                  out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_csv(rows, out / "eval.csv"), "plot": plot_metrics(rows, out / "eval.png")}
    files["json"] = out / "eval.json"
    files["json"].write_text(json.dumps({
        "prompts": prompts, "seeds": seeds,
        "rows": [{"checkpoint": r.label, "step": r.step, "metrics": _json_numbers(r.metrics),
                  "per_seed": [_json_numbers(s) for s in r.per_seed]} for r in rows],
    }, indent=2))
    if "base" in images and len(rows) > 1 and images["base"].dim() == 4:  # images; videos get no grid
        files["samples"] = save_before_after_grid(images["base"], images[rows[-1].label], prompts,
                                                  out / "samples_base_vs_last.png")
    return files


# --------------------------------------------------------------------------- entry point

def run_eval(config, checkpoints: Sequence[str | Path] = (), prompts: str | None = None, include_base: bool = True,
             seeds: int = 1, out_dir: str | Path = "runs/eval", overrides: Sequence[str] = ()) -> EvalReport:
    """Build the model from `config`, evaluate the base and each checkpoint, write the outputs.

    `prompts`: a prompt file or builtin set (toy:eval); default: the config's held-out prompts.
    """
    resolved = [resolve_checkpoint(c) for c in checkpoints]  # a typo fails before the model is built
    model = EvalModel.build(config, overrides=list(overrides))
    prompt_list = load_prompts(prompts) if prompts else model.eval_prompts
    rows, images = compare(model, resolved, prompt_list, include_base, seeds)
    files = write_outputs(rows, images, prompt_list, seeds, out_dir)
    return EvalReport(rows, prompt_list, seeds, format_table(rows, len(prompt_list), seeds), files)
