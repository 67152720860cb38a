"""The layers of the tree: every import points down, and no two modules import each other (even lazily).

    rag_models -> index -> decoding -> training.config -> training.settings_check -> training.hydra_cli
    -> training.data -> training.evaluation -> training.lit -> training.demo

A module may import its own layer or any layer before it, never one after it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("rag_models", "index", "decoding", "training.config", "training.settings_check", "training.hydra_cli",
          "training.data", "training.evaluation", "training.lit", "training.demo")
PACKAGES = ("rag_models", "index", "decoding", "training")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """Index in LAYERS of the longest layer name that ``module`` is or lies inside; None outside the project."""
    found = [i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")]
    return max(found, key=lambda i: len(LAYERS[i])) if found else None


def _imports() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = _module_name(path)
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
            graph[name] = {t for t in targets if t.split(".")[0] in PACKAGES}
    return graph


GRAPH = _imports()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str):
    if module == "training":  # the bare package: its __init__ imports nothing
        assert not GRAPH[module]
        return
    own = _layer(module)
    assert own is not None, f"{module} belongs to no layer: add its sub-package to LAYERS"
    upward = [target for target in GRAPH[module] if (_layer(target) or 0) > own]
    assert not upward, f"{module} (layer {LAYERS[own]}) imports from a higher layer: {upward}"


def test_no_import_cycle():
    known = set(GRAPH)

    def resolve(target: str) -> str | None:
        """The project module a dotted import names (a package resolves to its __init__)."""
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in targets if (r := resolve(t)) and r != m} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [module, nxt]))
            if nxt not in state:
                visit(nxt, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
