"""The package's shape: no import circle between its modules, no hand-written module past ~400
lines, and the pure layers import nothing of the distributed ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sampa_ray"
GENERATED = PKG / "proto"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path: Path) -> set[str]:
    """The sampa_ray modules a module imports when it is imported (not inside functions, not
    under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
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
                    if (PKG.parent / (mod + "." + a.name).replace(".", "/")).exists() or \
                            (PKG.parent / ((mod + "." + a.name).replace(".", "/") + ".py")
                             ).exists():
                        out.add(f"{mod}.{a.name}")

    visit(tree.body)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if GENERATED not in p.parents]
    mods = {_module(p): p for p in files}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for dep in _top_level_imports(path):
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
