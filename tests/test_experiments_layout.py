"""glora.experiments imports without a circle: every module imports, and the graph of its
imports of one another (lazy imports inside functions included, which is where a circle
hides until the function runs) has no cycle."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import glora.experiments

PACKAGE = "glora.experiments"


def modules() -> dict[str, Path]:
    """Every module and package of glora.experiments, by dotted name, with its source file."""
    found = {PACKAGE: Path(glora.experiments.__file__)}
    for info in pkgutil.walk_packages(glora.experiments.__path__, prefix=PACKAGE + "."):
        spec = info.module_finder.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


def imported(name: str, source: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its source. ``from a import
    b`` counts ``a.b`` where that is a module, else ``a``; importing a module imports its
    packages first, so they count too."""
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    # A module's own packages are imported before it; they are not an edge of its own.
    return out - {name} - {p for p in known if name.startswith(p + ".")}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path whose last module is its first), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_circle():
    found = modules()
    graph = {name: imported(name, source, set(found)) for name, source in found.items()}
    assert graph["glora.experiments.sweep.command"] >= {
        "glora.experiments.grid.tuned",
        "glora.experiments.sweep.runner",
    }
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_a_circle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
