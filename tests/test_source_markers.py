"""`# Adapted from` / `# Copied from` markers: well formed, above the code they describe, and
naming the licence of the project they cite.

A marker is one comment line directly above the `def` / `class` (or its decorators) that
follows another project's function:

    # Adapted from <project> <path in that repository>::<function> (<SPDX licence>)

("Copied from" when it is a copy). Several sources take several lines.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("dancegrpo", "kernels")

#: project -> the SPDX identifier of its licence, as that repository's LICENSE file states it
LICENCES = {
    "diffusers": "Apache-2.0",       # huggingface/diffusers
    "transformers": "Apache-2.0",    # huggingface/transformers
    "open_clip": "MIT",              # mlfoundations/open_clip
    "HPSv2": "Apache-2.0",           # tgxs002/HPSv2
    "VideoAlign": "MIT",             # KwaiVGI/VideoAlign
    "flow_grpo": "MIT",              # yifan123/flow_grpo
    "DanceGRPO": "Apache-2.0",       # XueZeyue/DanceGRPO (the authors' release)
    "torchtitan": "BSD-3-Clause",    # pytorch/torchtitan
}

MARKER = re.compile(r"^\s*# (?:Adapted|Copied) from (?P<project>\S+) (?P<path>[\w./-]+\.\w+)"
                    r"::(?P<function>[A-Za-z_][\w.]*) \((?P<licence>[\w.+-]+)\)(?:  # noqa: E501)?$")
MENTION = re.compile(r"#.*\b(?:adapted|copied) from\b", re.IGNORECASE)
DEFINITION = re.compile(r"^\s*(?:def |async def |class |@)")


def marker_problems(text: str, where: str) -> list[str]:
    """Every malformed or misplaced marker of a source text, as '<where>:<line>: <problem>'."""
    problems = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not MENTION.search(line):
            continue
        found = MARKER.match(line)
        if found is None:
            problems.append(f"{where}:{number}: malformed marker {line.strip()!r}: write "
                            "'# Adapted from <project> <path>::<function> (<licence>)'")
            continue
        licence = LICENCES.get(found["project"])
        if licence is None:
            problems.append(f"{where}:{number}: unknown project {found['project']!r}: add it to LICENCES in "
                            f"{Path(__file__).name} with its licence")
        elif found["licence"] != licence:
            problems.append(f"{where}:{number}: {found['project']} is {licence}, the marker says {found['licence']}")
        below = next((other for other in lines[number:] if not MARKER.match(other)), "")
        if not DEFINITION.match(below):
            problems.append(f"{where}:{number}: the marker must sit directly above a def or class, found "
                            f"{below.strip()!r}")
    return problems


def _sources() -> list[Path]:
    files = []
    for top in SCANNED:
        for folder, dirs, names in os.walk(ROOT / top):   # symlinks (dancegrpo/kernels) not followed
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files)


def test_every_marker_is_well_formed_and_names_the_projects_licence():
    problems, cited = [], set()
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        problems += marker_problems(text, str(path.relative_to(ROOT)))
        cited |= {m["project"] for m in map(MARKER.match, text.splitlines()) if m}
    assert problems == []
    assert cited == set(LICENCES), f"projects in LICENCES that no marker cites: {sorted(set(LICENCES) - cited)}"


def test_the_check_refuses_malformed_and_misplaced_markers():
    good = "# Adapted from diffusers src/diffusers/schedulers/scheduling_ddim.py::DDIMScheduler.step (Apache-2.0)\n"
    assert marker_problems(good + "def step():\n", "x.py") == []
    assert marker_problems(good + good.replace("Adapted", "Copied") + "@decorator\nclass A:\n", "x.py") == []
    cases = {
        "# Adapted from diffusers scheduling_ddim.py (Apache-2.0)\ndef f():\n": "malformed marker",       # no ::
        "# adapted from diffusers's DDIM step\ndef f():\n": "malformed marker",                           # prose
        "# Adapted from diffusers src/a.py::f\ndef f():\n": "malformed marker",                           # no licence
        "# Adapted from diffusers src/a.py::f (MIT)\ndef f():\n": "diffusers is Apache-2.0, the marker says MIT",
        "# Adapted from somelib src/a.py::f (MIT)\ndef f():\n": "unknown project 'somelib'",
        "# Adapted from diffusers src/a.py::f (Apache-2.0)\n\ndef f():\n": "directly above a def or class",
        "x = 1  # Copied from open_clip src/a.py::f (MIT)\n": "malformed marker",                         # trailing
    }
    for text, expected in cases.items():
        problems = marker_problems(text, "x.py")
        assert len(problems) == 1 and expected in problems[0], (text, problems)
