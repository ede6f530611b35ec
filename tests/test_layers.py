"""The import layers of the engine, guarded: a lower layer never imports a higher one.

    core      records, layout, store, round state, config, execution, geometry, summary
    library   filters, specialists, refinement targets and metrics, the generated world
    stages    one module per stage (+ its helpers), the Florence-VL trainer
    top       the pipeline registry, the command line, the demo, round scoring, rounds

Every import counts, also those inside functions (a lazy import is still a dependency,
and was how a cycle hid before). Stages do not import one another: what they share is
in the layers below. No stage imports the generated world, which is for measuring the
engine, not running it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "stages", "specialists", "filters", "refinement")
CORE, LIBRARY, STAGES, TOP = range(4)
# Longest prefix wins.
LAYER_OF = {
    "engine": CORE,
    "engine.train.config": CORE,
    "engine.world": LIBRARY,
    "filters": LIBRARY,
    "specialists": LIBRARY,
    "refinement.targets": LIBRARY,
    "refinement.metrics": LIBRARY,
    "stages": STAGES,
    "engine.train": STAGES,
    "refinement": TOP,
    "engine.pipeline": TOP,
    "engine.run": TOP,
    "engine.demo": TOP,
}
LAYER_NAMES = ("core", "library", "stages", "top")
STAGE_MODULES = {
    f"stages.{n}" for n in ("ingest", "annotate", "merge", "filter", "export", "report")
}


def layer(module: str) -> int:
    matches = [p for p in LAYER_OF if module == p or module.startswith(p + ".")]
    return LAYER_OF[max(matches, key=len)]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(source: str) -> set[str]:
    """The project modules a source imports anywhere (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from engine import layout`` imports the module engine.layout.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    modules = {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }
    return {
        name: {m for m in project_imports(path.read_text()) if m in modules and m != name}
        for name, path in modules.items()
    }


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layering rules, as one readable line each."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if layer(target) > layer(module):
                found.append(
                    f"{module} ({LAYER_NAMES[layer(module)]}) imports "
                    f"{target} ({LAYER_NAMES[layer(target)]})"
                )
            if module in STAGE_MODULES and target in STAGE_MODULES:
                found.append(f"stage {module} imports stage {target}")
            if layer(module) == STAGES and target.startswith("engine.world"):
                found.append(f"{module} imports the generated world {target}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as the path that closes it."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_imports_a_higher_layer():
    assert violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer():
    for module in import_graph():
        assert module.split(".")[0] in PACKAGES and layer(module) in range(4)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("engine.store", "from stages.merge import run_merge", "engine.store (core) imports"),
        ("filters.regions", "def f():\n    import engine.run", "filters.regions (library)"),
        ("stages.filter", "from stages.merge import x", "stage stages.filter imports stage"),
        ("stages.export", "from engine.world import load_truth", "the generated world"),
    ],
)
def test_a_wrong_import_is_caught(module, source, expected):
    graph = import_graph()
    graph[module] = graph[module] | project_imports(source)
    assert any(expected in line for line in violations(graph))


def test_a_cycle_is_caught():
    graph = {"engine.a": {"engine.b"}, "engine.b": {"engine.c"}, "engine.c": {"engine.a"}}
    assert cycles(graph) == [["engine.a", "engine.b", "engine.c", "engine.a"]]
