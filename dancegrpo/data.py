"""Prompt sources and the per-iteration prompt draw."""
from __future__ import annotations

from pathlib import Path

import torch


def load_prompts(source: str) -> list[str]:
    """`toy:train` / `toy:eval` / `toy:all`, or a text file with one prompt a line."""
    if source.startswith("toy:"):
        from .toy import scenes
        split = source.split(":", 1)[1]
        train, held_out = scenes.split_prompts()
        choices = {"train": train, "eval": held_out, "all": scenes.all_prompts()}
        if split not in choices:
            raise ValueError(f"unknown builtin prompt set {source!r}: use toy:train, toy:eval or toy:all")
        return list(choices[split])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} not found (one prompt a line, or toy:train)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {source!r} has no prompts")
    return prompts


def prompts_for_iteration(prompts: list[str], iteration: int, count: int, seed: int) -> list[str]:
    """Epoch-wise shuffled draw, a pure function of (seed, iteration): resume needs no state."""
    order: list[int] = []
    start = iteration * count
    epoch = start // len(prompts)
    while len(order) < (start % len(prompts)) + count:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(len(prompts), generator=gen).tolist()
        epoch += 1
    offset = start % len(prompts)
    return [prompts[i] for i in order[offset: offset + count]]
