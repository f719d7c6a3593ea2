"""The import graph of the repository's own modules, read from the source (ast), for structure tests."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in the file, at any depth (or only the
    module-level ones, which run at import time)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def targets(module: str, names: list[str], known: set[str]) -> set[str]:
    """The known modules an import reaches: the module itself (unless the import only names
    submodules of it, `from . import x`) and any submodule it names."""
    hits = {f"{module}.{n}" for n in names if f"{module}.{n}" in known}
    if module in known and (not names or len(hits) < len(names)):
        hits.add(module)
    return hits


def graph(files: list[Path], top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the modules among `files` it imports."""
    known = {module_name(f) for f in files}
    return {module_name(f): set().union(set(), *[targets(m, n, known) for m, n in imports(f, top_level_only)])
            - {module_name(f)} for f in files}


def first_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first == last), or None for a DAG."""
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                path = trail + [node]
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None
