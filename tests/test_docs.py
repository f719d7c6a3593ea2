"""The README and docs/ stay true to the repository: links resolve, commands name real modules.

Cheap checks, no model runs: every relative link of README.md and docs/*.md points to a file
or folder of this repository; README.md stays short (under 150 lines); every module run as
`python -m <module>` (or `torchrun ... -m <module>`) in them is a module of this repository
that `-m` can run, so a figure whose command no longer exists is caught at least at that level.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
# `python -m mod`, `python3 -m mod`, `.venv/bin/python -m mod`, `torchrun --flags ... -m mod`.
_MODULE = re.compile(r"(?:\bpython3?|\btorchrun)\b[^`\n]*?\s-m\s+([A-Za-z_][\w.]*)")
# Modules of other projects that the docs run with -m (never this repository's).
_EXTERNAL = {"pip", "pytest", "venv"}


def _relative_links(text: str) -> list[str]:
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def _modules_run(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    joined = re.sub(r"(python3?|-m)\n\s*", r"\1 ", joined)  # a command wrapped inside a sentence
    return _MODULE.findall(joined)


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "quickstart.md", "extending.md", "layout.md"} <= names, names


def test_link_pattern_and_module_pattern_on_a_known_text():
    text = ("See [a](docs/a.md#x), ![img](quickstart/p.png), [web](https://example.com), [here](#top).\n"
            "`.venv/bin/python -m bench.e2e --iterations 2`, `OMP_NUM_THREADS=1 python -m\n  bench.ops_overhead`,\n"
            "torchrun --nnodes 4 \\\n    --rdzv-id x -m dancegrpo.cli train; `python3 -m pip install`")
    assert _relative_links(text) == ["docs/a.md", "quickstart/p.png"]
    assert _modules_run(text) == ["bench.e2e", "bench.ops_overhead", "dancegrpo.cli", "pip"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path):
    missing = [t for t in _relative_links(page.read_text(encoding="utf-8"))
               if not (page.parent / t).resolve().exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, (f"README.md has {lines} lines (limit {README_MAX_LINES}): "
                                      "move the detail to a page under docs/ and link it")


def _runnable_module_of_this_repo(name: str) -> str | None:
    """None if `python -m name` runs a module of this repository, else why not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError as err:
        return f"its package is missing ({err})"
    if spec is None:
        return "no such module"
    if spec.submodule_search_locations is not None:  # a package: -m runs its __main__
        if importlib.util.find_spec(f"{name}.__main__") is None:
            return "a package without __main__"
        origin = Path(next(iter(spec.submodule_search_locations)))
    else:
        origin = Path(spec.origin or "")
    if ROOT not in origin.resolve().parents:
        return f"it is not in this repository ({origin})"
    return None


def test_modules_named_in_commands_exist():
    problems, seen = [], set()
    for page in PAGES:
        for name in _modules_run(page.read_text(encoding="utf-8")):
            if name in seen or name in _EXTERNAL:
                continue
            seen.add(name)
            why = _runnable_module_of_this_repo(name)
            if why is not None:
                problems.append(f"{page.relative_to(ROOT)}: python -m {name}: {why}")
    assert seen, "no `python -m` command found: the pattern is broken"
    assert not problems, "\n".join(problems)
