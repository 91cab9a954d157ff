"""The package's import graph: no cycles, and subpackages that import only the layers below.

The graph is read from the source with ``ast`` (nothing is imported), so a cycle is reported as
the modules that form it rather than as whichever ImportError it would cause first. Imports under
``if TYPE_CHECKING:`` never run and are left out: an annotation may name a type of a higher
layer (``PlacementReport.memory`` is a planning ``Footprint``).
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import hf_flexoffload

PACKAGE = "hf_flexoffload"
ROOT = Path(hf_flexoffload.__file__).parent
# The subpackages, lowest first (the data flow of README's "Layout"): a module imports modules of
# its own subpackage and of the ones listed before it, never after. "" is the top level
# (``__init__``, ``cli``, ``demo``), which may import everything.
LAYERS = (
    "config",
    "formats",
    "architectures",
    "storage",
    "checkpoints",
    "planning",
    "runtime",
    "modeling",
    "eval",
    "assets",
    "",
)
# House style: ~300 lines is a good module, 400 is too big.
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {PACKAGE: ROOT / "__init__.py"}

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = prefix + info.name
            if info.ispkg:
                found[name] = path / info.name / "__init__.py"
                walk(path / info.name, name + ".")
            else:
                found[name] = path / f"{info.name}.py"

    walk(ROOT, PACKAGE + ".")
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run: at module level or in functions, not under TYPE_CHECKING."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(name: str) -> set[str]:
    """The package's modules that importing ``name`` runs (the parent packages of each one
    included, except ``name``'s own: those are already being imported when it runs)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: one dot is the module's own package
            base = package.split(".")[: package.count(".") + 2 - node.level]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:  # ``from package import module`` imports that module
            submodule = f"{module}.{alias.name}"
            targets.add(submodule if submodule in MODULES else module)
    ours = {t for t in targets if t in MODULES}
    own = set(_parents(name))
    return {m for t in ours for m in (*_parents(t), t) if m != name and m not in own}


GRAPH = {name: _imported(name) for name in MODULES}


def _layer(name: str) -> str:
    """The subpackage a module belongs to; "" for the top-level modules."""
    parts = name.split(".")
    if len(parts) > 1 and MODULES[".".join(parts[:2])].name == "__init__.py":
        return parts[1]
    return ""


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the path that closes it (first node repeated), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_package():
    """The walk finds every module, and relative and absolute imports resolve into the graph."""
    assert {"hf_flexoffload.runtime.engine", "hf_flexoffload.eval.runner"} <= set(MODULES)
    assert "hf_flexoffload.formats.int4_tiled" in GRAPH["hf_flexoffload.formats.compression"]
    assert "hf_flexoffload.architectures.layers" in GRAPH["hf_flexoffload.architectures.opt"]
    assert "hf_flexoffload.eval.command" in GRAPH["hf_flexoffload.eval.arguments"]  # in a function
    # Type-only: placement names memory_model's Footprint under TYPE_CHECKING.
    assert "hf_flexoffload.planning.memory_model" not in GRAPH["hf_flexoffload.storage.placement"]


def test_no_import_cycles():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycles_are_found_and_reported_as_a_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_subpackage_has_a_layer():
    assert {_layer(name) for name in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_subpackages_import_only_lower_layers(layer):
    rank = LAYERS.index(layer)
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _layer(name) == layer
        for target in targets
        if LAYERS.index(_layer(target)) > rank
    )
    assert not upward, f"{layer} imports a higher layer: " + "; ".join(upward)


def test_modules_stay_small():
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {n: c for n, c in lines.items() if c > MAX_LINES}, "split these by concept"
