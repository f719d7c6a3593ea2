"""The GPU suite: one command that measures dancegrpo on one GPU and writes a report.

    python -m bench.gpu --out DIR            # on a GPU machine (H100/H200: at most 8 minutes)
    python -m bench.gpu --tiny --out DIR     # every section at tiny sizes, on a CPU (the test's run)

Sections (each in its own worker process, each with a time budget; see docs/gpu.md):
env (machine, versions, extension build), correctness (a), ops_timing (b), sta (c),
quickstart (f), grpo_iteration (e), model_steps (d). DIR gets summary.md and, per section,
<section>.csv and <section>.json; worker logs are under DIR/logs/.
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: Run order. model_steps is last: its units are in priority order and it takes the time left.
SECTIONS = ("env", "correctness", "ops_timing", "sta", "quickstart", "grpo_iteration", "model_steps")


def section_module(name: str) -> ModuleType:
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}: choose from {', '.join(SECTIONS)}")
    return importlib.import_module(f"bench.gpu.{name}")
