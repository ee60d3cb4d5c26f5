"""The package's shape: no import circle between its modules (imports inside functions
included), no hand-written module past 400 lines and no function past 60, and the pure layers
import nothing of the distributed ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sampa_ray"
GENERATED = PKG / "proto"
#: the longest a function may be, from its ``def`` line to its last line
MAX_FUNCTION_LINES = 60
#: functions allowed past it, as "module:qualified name": declarative tables only (a long
#: list of definitions read top to bottom), none today
LONG_FUNCTIONS: set[str] = set()


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _hand_written() -> list[Path]:
    return [p for p in PKG.rglob("*.py") if GENERATED not in p.parents]


def _imports(path: Path) -> set[str]:
    """The sampa_ray modules a module imports, at its top or inside its functions (an import
    deferred into a function still closes a circle, only later); not those under ``if
    TYPE_CHECKING``, which never run."""
    tree = ast.parse(path.read_text())
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sampa_ray"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("sampa_ray"):
                continue
            out.add(mod)
            for a in node.names:  # `from . import algorithms` names a module
                sub = (PKG.parent / (mod + "." + a.name).replace(".", "/"))
                if sub.exists() or sub.with_suffix(".py").exists():
                    out.add(f"{mod}.{a.name}")
    return out


def _graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in _hand_written()}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for dep in _imports(path):
            # importing a.b.c imports a and a.b too
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        # a module's own packages are being imported already when it runs: not a circle
        mine = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {d for d in deps if d in mods and d != name and d not in mine}
    return graph


def test_the_import_graph_has_no_circle() -> None:
    graph = _graph()
    assert "sampa_ray.ray.coordinator" in graph and "sampa_ray.loop" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_api_runs_through_the_runner_not_the_cli() -> None:
    """``sampa_ray.fit`` and the CLI share one entry (``runner.run``); the api imports nothing
    of the CLI. It imports the runner inside a function (so ``import sampa_ray`` loads no
    backend): the graph has that edge all the same."""
    api = _graph()["sampa_ray.api"]
    assert "sampa_ray.runner" in api
    assert not {m for m in api if m == "sampa_ray.cli" or m.startswith("sampa_ray.cli.")}


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """Every function and method, nested ones too: (qualified name, lines)."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                out.append((name, node.end_lineno - node.lineno + 1))
            out += _functions(node, f"{name}.")
        else:
            out += _functions(node, prefix)
    return out


def test_no_function_is_past_60_lines() -> None:
    long = {f"{_module(p)}:{name}": n for p in _hand_written()
            for name, n in _functions(ast.parse(p.read_text())) if n > MAX_FUNCTION_LINES}
    assert {k: v for k, v in long.items() if k not in LONG_FUNCTIONS} == {}
    assert set(long) >= LONG_FUNCTIONS, "an exception that is no longer needed"


def test_no_hand_written_module_is_past_400_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if GENERATED not in p.parents and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_pure_layers_import_no_ray_grpc_or_prometheus() -> None:
    code = ("import sys, sampa_ray.algorithms, sampa_ray.loop, sampa_ray.local, "
            "sampa_ray.engine, sampa_ray.config, sampa_ray.task, sampa_ray.plugins, "
            "sampa_ray.api, sampa_ray.data.sources; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'grpc', 'prometheus_client')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_importing_the_package_starts_nothing() -> None:
    """``import sampa_ray`` (for ``fit`` / ``load``) loads neither torch nor Ray nor gRPC."""
    code = ("import sys, sampa_ray; assert callable(sampa_ray.fit) and callable(sampa_ray.load); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'ray', 'grpc', 'prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
