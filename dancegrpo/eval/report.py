"""What a finished run leaves for people to look at.

- `reward_curve.png`: training reward per iteration (with a moving average);
- `samples_before_after.png`: held-out prompts, base vs tuned, same initial noise;
- `summary.json` and one summary line: base and tuned held-out metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..metrics import plot_metric, read_metrics


def save_eval_images(run_dir: str | Path, tag: str, images: torch.Tensor) -> Path:
    path = Path(run_dir) / "eval" / f"{tag}_samples.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.detach().float().cpu().contiguous()}, str(path))
    return path


def load_eval_images(run_dir: str | Path, tag: str) -> torch.Tensor | None:
    path = Path(run_dir) / "eval" / f"{tag}_samples.safetensors"
    return load_file(str(path))["images"] if path.is_file() else None


def save_before_after_grid(before: torch.Tensor, after: torch.Tensor, prompts: list[str], out_png: str | Path,
                           columns: int = 4, max_items: int = 16) -> Path:
    """Pairs of (base, tuned) images, each pair titled with its prompt."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(max_items, len(prompts), len(before), len(after))
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.2 * 2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        r, c = divmod(i, columns)
        for j, (label, img) in enumerate((("base", before[i]), ("tuned", after[i]))):
            ax = axes[r, 2 * c + j]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(f"{label}\n{prompts[i]}" if j == 0 else f"{label}\n", fontsize=7, loc="left")
    fig.suptitle("held-out prompts, same initial noise: base (left) vs tuned (right)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def summary_line(base: dict, final: dict, num_prompts: int) -> str:
    parts = []
    for key in sorted(final):
        if key in base:
            parts.append(f"{key.removeprefix('eval/')} {base[key]:.3f} -> {final[key]:.3f}")
    return f"held-out ({num_prompts} prompts, ODE sampler): " + "; ".join(parts)


def write_report(run_dir: str | Path, base: dict | None, final: dict, prompts: list[str]) -> str:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    reward_keys = sorted({k for row in rows for k in row if k.startswith("reward/") and k.endswith("_mean")})
    for i, key in enumerate(reward_keys):
        name = "reward_curve.png" if i == 0 else f"reward_curve_{key.split('/')[1].removesuffix('_mean')}.png"
        plot_metric([r for r in rows if key in r], key, run_dir / name, smooth=5, title=f"training {key}")
    before, after = load_eval_images(run_dir, "base"), load_eval_images(run_dir, "final")
    if before is not None and after is not None:
        save_before_after_grid(before, after, prompts, run_dir / "samples_before_after.png")
    base = base or {}
    line = summary_line(base, final, len(prompts))
    (run_dir / "summary.json").write_text(json.dumps({"base": base, "final": final, "summary": line}, indent=2))
    return line
