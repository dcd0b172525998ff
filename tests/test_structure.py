"""The shape of the package: no import cycles; leaf modules stay leaves."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lowbit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the lowbit modules it imports, at any depth of its code (imports inside
        functions count: they are cycles put off, not removed), plus the sub-packages whose
        __init__ such an import runs. The root package is left out: importing any submodule runs
        it, and it only gathers the public names. Nor does a module's own package count when it
    imports a sibling: that package's __init__ ran before the module did."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the module and the sub-packages on its way
                    dotted = ".".join(parts[:i])
                    inside = name.startswith(dotted + ".")  # its own package ran before it did
                    if dotted in modules and dotted != name and not (inside and i < len(parts)):
                        graph[name].add(dotted)
    return graph


def test_the_import_graph_of_lowbit_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "lowbit.walker" in graph["lowbit.allocate.sensitivity"]
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_finds_a_cycle():
    graph = import_graph()
    graph["lowbit.records"].add("lowbit.quantize")  # what artifact -> quantize once did
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())


def test_leaf_modules_import_nothing_of_lowbit_but_errors():
    graph = import_graph()
    for leaf in ("lowbit.records", "lowbit.modules", "lowbit.digests", "lowbit.version", "lowbit.errors"):
        assert graph[leaf] == set(), leaf
    assert graph["lowbit.dtypes"] == {"lowbit.errors"}
