"""The package's shape: imports run one way, from the bottom, and nothing goes in a circle.

Every import of an hposvc module counts, the lazy ones inside functions too: a lazy import
of a higher module is still a low module reaching up. Subpackages (``report``,
``recommendation``, ``population``, ``nn``) count as one module each.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hposvc

PACKAGE = Path(hposvc.__file__).parent

# The layers, lowest first (DESIGN.md's flow). A module may import its own layer and the
# ones below; within a layer the cycle check keeps it one-way.
LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "interrupts", "stats", "builtin"},
    {"storage"},
    {"records", "proxy", "outbox"},
    # what a trial trains: the stages below the service
    {"devices", "spec", "space", "tasks", "sequences", "nn", "optim", "train", "probes", "population", "context", "plugins", "script", "isolate"},
    {"queue", "tracking", "dashboard"},
    {"trial"},
    {"worker"},
    {"study", "results"},
    {"launcher"},
    # above results and tracking; never imported by the core (the tracking process, drain,
    # runs in its own process and is started by module name)
    {"report", "recommendation", "drain"},
    {"cli", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _node(module: str) -> str:
    """``hposvc.report.stats`` -> ``report``; ``hposvc`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if "_studies" in module or module.startswith("hposvc.studies"):
            continue
        src = _node(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative import
                    base = ".".join(module.split(".")[: -node.level] + ([node.module] if node.module else []))
                # `from hposvc import records` imports the module hposvc.records
                targets = [f"{base}.{a.name}" if base == "hposvc" else base for a in node.names]
            for t in targets:
                if t == "hposvc" or t.startswith("hposvc."):
                    dst = _node(t)
                    if dst != src:
                        graph.setdefault(src, set()).add(dst)
        graph.setdefault(src, set())
    return graph


def test_every_module_has_a_layer() -> None:
    unknown = sorted(set(_imports()) - set(RANK))
    assert not unknown, f"modules without a layer in tests/test_architecture.py LAYERS: {unknown}"


def test_no_module_imports_a_higher_layer() -> None:
    graph = _imports()
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if a in RANK and b in RANK and RANK[b] > RANK[a])
    assert not upward, "low modules importing higher ones:\n" + "\n".join(upward)


def test_the_package_has_no_import_circle() -> None:
    graph = _imports()
    # Depth-first search for a back edge; report the circle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (circle := visit(n)):
            raise AssertionError("import circle: " + " -> ".join(circle))


def test_the_check_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    # The walker must count imports inside functions and `from hposvc import x` forms,
    # or the two tests above could pass on a knotted package.
    graph = _imports()
    assert "report" in graph["cli"]  # lazy, inside a command
    assert "records" in graph["trial"]  # `from hposvc import records`
    assert "storage" in graph["queue"]


def test_private_optuna_names_stay_in_the_queue_adapter() -> None:
    # Optuna's private names (study._storage, trial._trial_id, ...) are read in one place,
    # hposvc/queue.py's adapter, which tests/test_queue.py pins.
    private = ("._storage", "._study_id", "._trial_id", "._pop_waiting_trial_id", "._get_stale_trial_ids", "._backend")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "queue.py" and path.parent == PACKAGE:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if any(p in line for p in private) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "private Optuna API outside hposvc/queue.py:\n" + "\n".join(offenders)
