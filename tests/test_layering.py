"""The package's structure: no import cycles among harness/'s modules, counting every import
(module level, inside functions, and under TYPE_CHECKING), found by walking the source's AST."""

import ast
from pathlib import Path

import stance_harness

ROOT = Path(stance_harness.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            targets = [".".join(module + [a.name]) for a in node.names] + [".".join(module)]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] == "stance_harness":
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_harness_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["stance_harness.runs.training"]  # the walk saw the package
    assert cycles(graph) == []


# The layers, bottom first, as the README's Layout lists them: a module may import modules of
# its own layer or of a lower one, never of a higher one.
LAYERS = [
    ["stance_harness.core.errors", "stance_harness.core.registry"],
    ["stance_harness.core.config", "stance_harness.core.files", "stance_harness.core.provenance", "stance_harness.runs.data",
     "stance_harness.runs.adapter_spec", "stance_harness.runs.runset", "stance_harness.core.metrics",
     "stance_harness.core.devices", "stance_harness.core.results", "stance_harness.core.stages"],
    ["stance_harness.report.records", "stance_harness.analysis"],
    ["stance_harness.models"],
    ["stance_harness.stances", "stance_harness.runs.recipe"],
    ["stance_harness.runs.instruments", "stance_harness.runs.batches", "stance_harness.runs.master_weights"],
    ["stance_harness.measure", "stance_harness.judges"],
    ["stance_harness.runs.tasks"],
    ["stance_harness.runs.methods"],
    ["stance_harness.where"],
    ["stance_harness.measurements"],
    ["stance_harness.runs.request", "stance_harness.runs.services"],
    ["stance_harness.runs.run"],
    ["stance_harness.runs.training"],
    ["stance_harness.runs.runstore", "stance_harness.runs.residency"],
    ["stance_harness.runs.adapters", "stance_harness.runs.from_model", "stance_harness.checks", "stance_harness.report.gate", "stance_harness.report.sections",
     "stance_harness.report.verdicts", "stance_harness.report.model", "stance_harness.report.findings", "stance_harness.report.figures"],
    ["stance_harness.report.markdown", "stance_harness.report.html"],
    ["stance_harness.report.store"],
    ["stance_harness.session", "stance_harness.outcome", "stance_harness.options", "stance_harness.scaffold",
     "stance_harness.runs.distributed", "stance_harness.runs.planning", "stance_harness.runs.executors_ray",
     "stance_harness.runs.provision",
     "stance_harness.runs.workers"],
    ["stance_harness.callback"],
    ["stance_harness.plugin", "stance_harness.fixture", "stance_harness.judging", "stance_harness.progress", "stance_harness.cli"],
]


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def test_every_module_has_a_layer():
    packages = {"stance_harness", "stance_harness.report", "stance_harness.core", "stance_harness.runs"}  # package faces: docstrings and lazy exports only
    assert [m for m in import_graph() if layer_of(m) is None and m not in packages] == []


def test_no_module_imports_from_a_higher_layer():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets
              if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_layer_check_can_fail():
    assert layer_of("stance_harness.plugin") > layer_of("stance_harness.runs.training") > layer_of("stance_harness.core.registry")
