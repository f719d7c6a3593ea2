"""Prompt sources and the per-iteration prompt draw."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch

from .io_errors import read_text

#: Builtin prompt sets: a source `<prefix>:<name>` is `PROMPT_SETS[name]()` of the module
#: registered for `<prefix>`, imported on first use. The toy world registers `toy`
#: (dancegrpo.toy.grammar: `toy:train`, `toy:eval`, `toy:eval_all`, `toy:all`).
PROMPT_SET_MODULES: dict[str, str] = {"toy": "dancegrpo.toy.grammar"}


def register_prompt_sets(prefix: str, module: str) -> None:
    """Make `<prefix>:<name>` sources read `PROMPT_SETS[name]()` (a dict of name -> function
    returning a list of prompts) of the importable `module`. Raises ValueError for a prefix
    that is empty, holds a ':' or is already registered to another module."""
    if not prefix or ":" in prefix:
        raise ValueError(f"prompt set prefix {prefix!r} must be non-empty and hold no ':'")
    if PROMPT_SET_MODULES.get(prefix, module) != module:
        raise ValueError(f"prompt set prefix {prefix!r} is already registered to {PROMPT_SET_MODULES[prefix]!r}")
    PROMPT_SET_MODULES[prefix] = module


def builtin_prompt_sets(prefix: str) -> dict[str, Callable[[], list[str]]]:
    """The named prompt sets registered for `prefix` (imports its module)."""
    return importlib.import_module(PROMPT_SET_MODULES[prefix]).PROMPT_SETS


def load_prompts(source: str) -> list[str]:
    """A builtin prompt set (`<prefix>:<name>`, see PROMPT_SET_MODULES) or a UTF-8 text file
    with one prompt a line.

    Raises FileNotFoundError (no such file) or ValueError (an unknown set of a registered
    prefix; a file not UTF-8, naming the line, or empty).

    Toy builtins: `toy:train` and `toy:eval` are disjoint and kind-balanced (every prompt kind
    equally often; small kinds repeat, so `toy:eval` has repeated prompts, each repeat a new
    seed); `toy:eval_all` is every held-out prompt once and `toy:all` the whole grammar.
    """
    prefix, colon, name = source.partition(":")
    if colon and prefix in PROMPT_SET_MODULES:
        choices = builtin_prompt_sets(prefix)
        if name not in choices:
            raise ValueError(f"unknown builtin prompt set {source!r}: use one of "
                             f"{', '.join(f'{prefix}:{n}' for n in choices)}")
        return list(choices[name]())
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
