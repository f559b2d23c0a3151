"""No import cycles in the package: every ``import`` of a research_rl module, at module level or inside a function,
is an edge, and the graph must have no strongly connected component of more than one module (nor a module that
imports itself). Lazy imports count: a cycle hidden in a function still couples the two modules both ways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("research_rl", "retriever_service")


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """``{dotted module name: source}`` for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path.read_text()
    return out


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: modules of the packages it imports}``; ``from a.b import c`` is an edge to ``a.b.c`` when that
    is a module, else to ``a.b``."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sources else node.module
                           for a in node.names]
            for t in targets:
                while t and t not in sources:  # `import a.b.c` of a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_detector_finds_a_lazy_cycle_and_accepts_a_chain():
    sources = {"research_rl.a": "from research_rl.b import f\n",
               "research_rl.b": "def f():\n    from research_rl import a\n",
               "research_rl.c": "import research_rl.a\n"}
    assert cycles(import_graph(sources)) == [["research_rl.a", "research_rl.b"]]
    sources["research_rl.b"] = "def f():\n    pass\n"
    assert cycles(import_graph(sources)) == []


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph(module_sources()))
    assert not found, "import cycles (each line one cycle; imports inside functions count):\n" + "\n".join(
        " <-> ".join(c) for c in found)
