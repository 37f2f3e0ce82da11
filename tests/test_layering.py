"""The package's layering, checked on the source (docs/architecture.md): no module imports another
module's ``_private`` names (tests and benchmarks included), no import cycle among the package's
modules (function-level imports counted), and the lower layers never import the higher ones."""

from __future__ import annotations

import ast
import os

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "optimum_prune"
# a module of the left may not import one whose name starts with a prefix on the right
ROOMS = ("optimum_prune.calibration", "optimum_prune.engine", "optimum_prune.runtime")
TOP = ("optimum_prune.pruner", "optimum_prune.commands")
LOWER_LAYERS = {
    "optimum_prune.errors": ("optimum_prune.",),
    "optimum_prune.paths": ("optimum_prune.",),
    "optimum_prune.patterns": ("optimum_prune.configuration", "optimum_prune.methods", "optimum_prune.structure",
                               *ROOMS, *TOP),
    "optimum_prune.structure": ("optimum_prune.methods", "optimum_prune.configuration", *ROOMS, *TOP,
                                "optimum_prune.output"),
    "optimum_prune.methods": ("optimum_prune.configuration", *ROOMS, *TOP, "optimum_prune.output"),
    "optimum_prune.registry": ("optimum_prune.configuration", *ROOMS, *TOP),
    "optimum_prune.locks": (*ROOMS, *TOP),
    "optimum_prune.output": (*ROOMS, *TOP),
    # devices, processes and host memory: below calibration and the engine room
    "optimum_prune.runtime": ("optimum_prune.calibration", "optimum_prune.engine", "optimum_prune.methods",
                              "optimum_prune.configuration", *TOP),
    # calibration data, statistics, hooks and profiles: below the engine room
    "optimum_prune.calibration": ("optimum_prune.engine", *TOP),
    # the engine room: never the orchestrator or the CLI
    "optimum_prune.engine": TOP,
    # the export formats read saved folders and config dicts: never the engine, the pruner or the CLI
    "optimum_prune.export": (*ROOMS, *TOP, "optimum_prune.methods"),
    # the modelling files are copied next to the weights: torch and transformers only
    "optimum_prune.modeling": ("optimum_prune.",),
}


def python_files(*folders):
    for folder in folders:
        for directory, _, files in os.walk(os.path.join(REPO, folder)):
            if "__pycache__" in directory:
                continue
            yield from (os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))


def module_name(path: str) -> str:
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


MODULES = {module_name(p): p for p in python_files(PACKAGE)}


def imports(path: str):
    """(module imported from, names) for every ``from X import ...`` and ``import X`` in a file,
    relative imports resolved."""
    module = module_name(path)
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield source, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            target = _importlib_target(node, package)
            if target is not None:  # a prefix: every module under it may be imported
                yield from ((name, []) for name in MODULES if name == target or name.startswith(target))


def _is_import_module(func) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _importlib_target(call: ast.Call, package: list[str]) -> str | None:
    """What ``importlib.import_module(...)`` imports: the module of a constant name, or the prefix
    of an f-string (relative names resolved against the caller's package)."""
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        name = first.value
    elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
        name = first.values[0].value
    else:
        return None
    if name.startswith("."):
        level = len(name) - len(name.lstrip("."))
        name = ".".join(package[: len(package) - (level - 1)]) + "." + name.lstrip(".")
    return name if name.startswith(PACKAGE) else None


def test_no_module_imports_a_private_name_of_another():
    local = {module_name(p).split(".")[-1] for p in python_files("benchmarks", "tests")}  # script-style imports
    offenders = []
    for path in python_files(PACKAGE, "tests", "benchmarks", "examples"):
        for source, names in imports(path):
            if not (source.startswith(PACKAGE) or source in local):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{os.path.relpath(path, REPO)}: from {source} import {', '.join(private)}")
    assert not offenders, offenders


def dependency_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for source, names in imports(path):
            if not source.startswith(PACKAGE):
                continue
            for name in names or [""]:
                full = f"{source}.{name}" if name else source
                deps.add(full if full in MODULES else source)
        graph[module] = {d for d in deps if d in MODULES and d != module}
    return graph


def test_no_import_cycle():
    graph = dependency_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("lower", sorted(LOWER_LAYERS))
def test_lower_layers_do_not_import_higher_ones(lower):
    forbidden = LOWER_LAYERS[lower]
    graph = dependency_graph()
    offenders = [f"{module} imports {dep}" for module, deps in graph.items()
                 if module == lower or module.startswith(lower + ".")
                 for dep in deps if dep.startswith(forbidden) and not dep.startswith(lower)]
    assert not offenders, offenders


def test_the_cycle_check_sees_importlib():
    """registry imports the methods through importlib: the graph holds those edges (a method that
    imported the registry would be a cycle the check reports)."""
    graph = dependency_graph()
    assert "optimum_prune.methods.sparsegpt" in graph["optimum_prune.registry"]
    assert "optimum_prune.registry" not in graph["optimum_prune.methods.policy_gradient"]


def functions(path):
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    yield from (node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_no_function_over_60_lines():
    long = [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for module, path in MODULES.items()
            for node in functions(path) if node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_the_layer_engine_stays_small():
    with open(MODULES["optimum_prune.engine.layerwise"], encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) < 300


def test_nobody_asks_which_engine_or_task_it_holds():
    """The engines share one interface (`engine.base.Engine`) and the kinds of work one protocol
    (`engine.tasks.base.Task`): no ``isinstance`` on their classes outside their own modules."""
    classes = {"Engine": "optimum_prune.engine.base", "LayerwiseEngine": "optimum_prune.engine.layerwise",
               "DepthEngine": "optimum_prune.engine.depth",
               "GlobalStructuredEngine": "optimum_prune.engine.global_search",
               "Task": "optimum_prune.engine.tasks.base", "LinearTask": "optimum_prune.engine.tasks.linear",
               "ExpertTask": "optimum_prune.engine.tasks.expert_bank",
               "GroupTask": "optimum_prune.engine.tasks.channel_group",
               "ExpertChannelTask": "optimum_prune.engine.tasks.expert_channels",
               "ExpertDropTask": "optimum_prune.engine.tasks.expert_drop"}
    offenders = []
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance",
                                                                                                  "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
                offenders += [f"{module}: isinstance(..., {name})" for name in names
                              if name in classes and classes[name] != module]
    assert not offenders, offenders


def test_the_light_registration_knows_every_model_type():
    from optimum_prune.auto_registration import MODEL_TYPES
    from optimum_prune.modeling import PRUNED_CLASSES, DeciLMConfig

    assert sorted(MODEL_TYPES) == sorted([c.model_type for c, _ in PRUNED_CLASSES.values()] + [DeciLMConfig.model_type])


def test_the_checks_see_the_package():  # guards against a walk that silently finds nothing
    graph = dependency_graph()
    assert len(graph) > 40
    assert "optimum_prune.patterns" in graph["optimum_prune.methods.masks"]
    assert "optimum_prune.configuration" in graph["optimum_prune.pruner"]
