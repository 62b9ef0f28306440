"""The import graph of ``src/stinfer``: no cycle, and no layer imports a layer above it.

Every ``import`` and ``from ... import`` of every module is an edge from the importing module to
the imported one, wherever it sits: at module level, inside a function (a lazy import still
makes one module depend on the other), under ``if TYPE_CHECKING``. Modules are read with
``ast``, never imported. Imports by name at run time (``importlib.import_module(variable)``,
the registries' ``"module:Class"`` strings) are not seen.

Two rules:

1. **No cycle** between modules, nor between layers: a cycle means neither side can be read,
   tested or imported without the other. The test names the modules of each cycle.
2. **No upward import.** The layers, lowest first (:data:`LAYERS`); a module may import
   modules of its own layer and of the layers *below* its own, never one of a higher layer nor
   another package of its own tier:

   ==  ==================  ============================================================
   0   ``errors``          the one user-error type
   1   ``modalities``,     the modality vocabulary (``fused``/``image``/``spatial``);
       ``logs``,           what a run prints (each line once, third-party noise filtered);
       ``distributed``,    independent tasks on Ray (start, threads per task, results);
       ``stinfer``         the package's front door (``__version__``, lazy submodules)
   2   ``io``, ``nn``,     readers and the slide data model (never torch); pure torch
       ``train``           modules; the one Lightning training path
   3   ``preprocess``      normalisation and gene selection (reads slides through ``io``)
   4   ``metrics``,        the papers' expression metrics; figures (read slides through
       ``plot``            ``io``)
   5   ``data``            patches, datasets, image features (``nn`` backbones), synthetic
   6   ``coexpression``    the gene-embedding pipeline (``io``, ``preprocess``, ``train``)
   7   ``models``          what a user holds: STEvs, CoxFormer, baselines, gene baselines
   8   ``evaluate``,       protocols, benchmarks, reports (use models, metrics and plots);
       ``cohort``          a cohort of slides predicted one task per slide (Ray on request)
   9   ``cli``             the ``stinfer`` command
   10  ``__main__``        ``python -m stinfer``
   ==  ==================  ============================================================

   So models never import ``evaluate`` (what both need, the metrics and the slide helpers,
   sits below both), and a figure never needs the benchmark that draws it.

A layer is the first name under ``stinfer`` (``stinfer.models.stevs`` -> ``models``; the root
``stinfer/__init__.py`` is the layer ``stinfer``). A new subpackage fails the test until it is
given a place in :data:`LAYERS` (and in the table of ``docs/DESIGN.md`` "Layers").
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

PACKAGE = "stinfer"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("modalities", "logs", "distributed", PACKAGE),
    ("io", "nn", "train"),
    ("preprocess",),
    ("metrics", "plot"),
    ("data",),
    ("coexpression",),
    ("models",),
    ("evaluate", "cohort"),
    ("cli",),
    ("__main__",),
)

Graph = Mapping[str, set[str]]


# --------------------------------------------------------------------------- the graph
def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package folder)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (None: none is)."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imported_modules(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` (the file ``path``) imports, anywhere in it."""
    package_root = module.split(".")[0]
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for name in names:
            if name.split(".")[0] != package_root:
                continue
            target = _resolve(name, modules)
            if target is not None and target != module:
                targets.add(target)
    return targets


def import_graph(root: Path = SOURCE, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (module level and inside functions)."""
    modules = module_files(root, package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> str:
    """``stinfer.models.stevs`` -> ``models``; the root package is its own layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------- the checks
def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one node.

    Tarjan's algorithm for the components, then a shortest path back to the start inside each,
    so the message names a real cycle, not just a tangle.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(component, graph) for component in components]


def _cycle_through(component: Sequence[str], graph: Graph) -> list[str]:
    """A shortest cycle from the component's first node back to itself, inside the component."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target not in members:
                    continue
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    return [*component, component[0]]  # not reached for a strongly connected component


def layer_graph(graph: Graph) -> dict[str, set[str]]:
    """The module graph collapsed to layers (imports inside a layer dropped)."""
    layers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = layer_of(module)
        layers.setdefault(source, set())
        layers[source] |= {layer_of(t) for t in targets if layer_of(t) != source}
    return layers


def upward_imports(graph: Graph, layers: Sequence[Sequence[str]] = LAYERS) -> list[str]:
    """Every import of a module of a higher layer, or of another layer of the same tier."""
    tier = {name: position for position, names in enumerate(layers) for name in names}
    problems = []
    for module in sorted(graph):
        source = layer_of(module)
        if source not in tier:
            problems.append(f"{module}: layer {source!r} is not in LAYERS; give it a place")
            continue
        for target in sorted(graph[module]):
            layer = layer_of(target)
            if layer == source:
                continue
            if layer not in tier:
                problems.append(f"{target}: layer {layer!r} is not in LAYERS; give it a place")
            elif tier[layer] >= tier[source]:
                problems.append(
                    f"{module} imports {target}: layer {source!r} (tier {tier[source]}) may "
                    f"not import {layer!r} (tier {tier[layer]})"
                )
    return problems


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


# --------------------------------------------------------------------------- stinfer itself
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    assert SOURCE.is_dir(), f"{SOURCE} not found: run the tests from a checkout of the repo"
    return import_graph()


def test_no_module_of_stinfer_is_part_of_an_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between modules:\n" + describe(cycles)


def test_no_cycle_between_the_layers_of_stinfer(graph):
    cycles = find_cycles(layer_graph(graph))
    assert not cycles, "import cycles between layers:\n" + describe(cycles)


def test_no_module_of_stinfer_imports_a_higher_layer(graph):
    problems = upward_imports(graph)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_models_never_import_the_evaluation_package(graph):
    reached = {t for m, targets in graph.items() if layer_of(m) == "models" for t in targets}
    assert not [t for t in reached if layer_of(t) == "evaluate"]


def test_the_graph_sees_function_local_imports_of_stinfer(graph):
    """A lazy import counts: ``cli.impute`` reaches the held-out genes protocol inside ``run``."""
    assert "stinfer.evaluate.held_out_genes" in graph["stinfer.cli.impute"]
    assert "stinfer.nn.backbones" in graph["stinfer.nn"]  # registers stinfer_histology_cnn


# --------------------------------------------------------------------------- the checker
def write_package(root: Path, files: Mapping[str, str]) -> Path:
    """A throwaway package ``pkg`` under ``root`` with these ``relative path -> source`` files."""
    package = root / "pkg"
    for relative, source in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package


def test_checker_finds_a_cycle_through_a_function_local_and_a_relative_import(tmp_path):
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "def f():\n    from pkg.high import b\n",  # lazy, upward
            "high/__init__.py": "",
            "high/b.py": "from ..low.a import f\nimport os\n",  # relative, downward
            "high/c.py": "from pkg.high import b\nfrom pkg import low\n",
        },
    )
    graph = import_graph(package, "pkg")
    assert graph["pkg.low.a"] == {"pkg.high.b"}
    assert graph["pkg.high.b"] == {"pkg.low.a"}
    assert graph["pkg.high.c"] == {"pkg.high.b", "pkg.low"}
    assert find_cycles(graph) == [["pkg.high.b", "pkg.low.a", "pkg.high.b"]]
    assert find_cycles(layer_graph(graph)) == [["high", "low", "high"]]
    problems = upward_imports(graph, layers=(("low",), ("high",), ("pkg",)))
    assert problems == [
        "pkg.low.a imports pkg.high.b: layer 'low' (tier 0) may not import 'high' (tier 1)"
    ]


def test_checker_rejects_same_tier_imports_and_unplaced_layers_and_accepts_a_clean_graph():
    graph = {
        "pkg.io.read": {"pkg.errors"},
        "pkg.nn.net": {"pkg.io.read", "pkg.errors"},  # io and nn share a tier
        "pkg.errors": set(),
        "pkg.extra.thing": {"pkg.errors"},
    }
    layers = (("errors",), ("io", "nn"))
    assert upward_imports(graph, layers) == [
        "pkg.extra.thing: layer 'extra' is not in LAYERS; give it a place",
        "pkg.nn.net imports pkg.io.read: layer 'nn' (tier 1) may not import 'io' (tier 1)",
    ]
    clean = {"pkg.io.read": {"pkg.errors"}, "pkg.nn.net": {"pkg.errors"}, "pkg.errors": set()}
    assert upward_imports(clean, layers) == []
    assert find_cycles(clean) == []
