"""Prompt sources and the per-iteration prompt draw."""
from __future__ import annotations

from pathlib import Path

import torch

from .io_errors import read_text


# Samples per prompt kind in the held-out set: 5 kinds x 48 = 240 samples, so its accuracy is
# GenEval's overall score (the mean over kinds), not a relation score in disguise.
TOY_EVAL_PER_KIND = 48


def load_prompts(source: str) -> list[str]:
    """A builtin toy prompt set or a UTF-8 text file with one prompt a line.

    Raises FileNotFoundError (no such file) or ValueError (not UTF-8, naming the line, or empty).

    Builtins: `toy:train` and `toy:eval` are disjoint and kind-balanced (every prompt kind
    equally often; small kinds repeat, so `toy:eval` has repeated prompts, each repeat a new
    seed); `toy:eval_all` is every held-out prompt once and `toy:all` the whole grammar.
    """
    if source.startswith("toy:"):
        from .toy import scenes
        split = source.split(":", 1)[1]
        train, held_out = scenes.split_prompts()
        choices = {
            "train": lambda: scenes.balance_by_kind(train),
            "eval": lambda: scenes.balance_by_kind(held_out, TOY_EVAL_PER_KIND),
            "eval_all": lambda: held_out,
            "all": scenes.all_prompts,
        }
        if split not in choices:
            raise ValueError(f"unknown builtin prompt set {source!r}: use one of "
                             f"{', '.join('toy:' + name for name in choices)}")
        return list(choices[split]())
    text = read_text(Path(source), "prompt file", " (one prompt a line, or toy:train)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
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
