"""The house plan, checked on the source: one-way imports, small modules, no reaching into the trainer."""
from __future__ import annotations

from pathlib import Path

import pytest

from import_graph import REPO, first_cycle, graph, imports, module_name

PACKAGE = REPO / "dancegrpo"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts)
# Pure math may be longer: the formulas and their checks belong together.
PURE_MATH = {"dancegrpo/grpo.py", "dancegrpo/sde.py"}
MAX_LINES = 400


def test_no_import_cycle_in_the_package():
    """Not even through imports inside functions: a lazy import that closes a cycle is a layering
    mistake waiting for the first eager import."""
    cycle = first_cycle(graph(SOURCES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert first_cycle(edges) == ["a", "b", "c", "a"]
    assert first_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", [str(p.relative_to(REPO)) for p in SOURCES
                                  if str(p.relative_to(REPO)) not in PURE_MATH])
def test_modules_stay_small(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines: split it by job (at most {MAX_LINES} outside pure math)"


def _importers_of(target: str, files: list[Path]) -> list[str]:
    return [module_name(f) for f in files
            if any(m == target or (m == target.rpartition(".")[0] and target.rpartition(".")[2] in names)
                   for m, names in imports(f))]


def test_evaluation_and_the_bench_tools_never_build_a_trainer():
    """`dancegrpo eval`/`sample` and the measurement tools work from a RunContext (or EvalModel);
    only the commands that time or run training itself build a Trainer."""
    trains = {"dancegrpo.cli", "bench.e2e", "bench.overlap", "bench.contention", "bench.reference_loop",
              "bench.gpu.grpo_iteration"}
    files = SOURCES + sorted((REPO / "bench").rglob("*.py"))
    users = set(_importers_of("dancegrpo.trainer", files)) - {"dancegrpo.trainer"}
    assert users <= trains, f"these build a Trainer: {sorted(users - trains)}"
    assert not {u for u in users if u.startswith("dancegrpo.eval")}


def test_no_private_name_crosses_a_module_boundary():
    """A name another module needs is public and documented, not `_private`."""
    files = SOURCES + sorted((REPO / "bench").rglob("*.py"))
    crossing = [f"{f.relative_to(REPO)}: {sorted(n for n in names if n.startswith('_') and not n.startswith('__'))} "
                f"from {module}" for f in files for module, names in imports(f)
                if module.startswith("dancegrpo") and any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert not crossing, "\n".join(crossing)
