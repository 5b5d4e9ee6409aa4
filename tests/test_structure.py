"""The package's structure: no import cycles, the public API at the top level, one meaning per public name."""
from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import tdlib

PACKAGE = Path(tdlib.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every tdlib module -> the tdlib modules it imports, at module level or inside functions."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [known(f"{base}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "tdlib.attribution.capture" in graph and len(graph) > 30  # the walk saw the package
    assert cycles(graph) == []


def test_the_main_entry_points_are_importable_from_the_package_without_loading_it():
    for name in tdlib.__all__:
        value = getattr(tdlib, name)
        assert callable(value), name
    assert tdlib.splice_pair is importlib.import_module("tdlib.splice").splice
    assert tdlib.train_adapters is importlib.import_module("tdlib.train").train
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        tdlib.nonsense  # noqa: B018
    # importing the package loads none of its heavy modules
    loaded = subprocess.run([sys.executable, "-c", "import sys, tdlib; print(sorted(m for m in sys.modules "
                             "if m.startswith(('tdlib.', 'torch', 'transformers'))))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_a_name_exported_by_the_package_is_not_also_a_module_of_it():
    modules = {path.stem for path in PACKAGE.glob("*.py")} | {path.name for path in PACKAGE.iterdir() if path.is_dir()}
    assert not set(tdlib.__all__) & modules
    for name in tdlib.__all__:
        assert inspect.getdoc(getattr(tdlib, name)), f"{name} has no docstring"


PAIR_BUILDERS_ON_THE_ORGANISM_TASK = {"tdlib.recipe"}
"""The recipe writes the organism's arithmetic task in natural language for a real base model: a pair builder
built on that task, like the organism's own builder."""


def test_general_modules_reach_the_organism_only_through_its_pair_kind():
    graph = import_graph()
    assert "tdlib.organism.kind" in graph
    reaching = {name: sorted(t for t in targets if t.startswith("tdlib.organism"))
                for name, targets in graph.items() if not name.startswith("tdlib.organism")}
    assert {name: t for name, t in reaching.items() if t and name not in PAIR_BUILDERS_ON_THE_ORGANISM_TASK} == {}
