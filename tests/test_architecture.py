"""The house plan, checked: no import cycles in surgeon/, layers import only downward, ruff clean.

The import graph is read from the source (every ``import``, including the ones
inside functions; ``if TYPE_CHECKING:`` blocks excluded, since they never run).
An edge goes to the module named: ``from .merge import kernels`` is an edge to
``surgeon.merge.kernels``, ``from .merge import get_method`` one to
``surgeon.merge`` (its ``__init__``). docs/architecture.md lists the layers.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "surgeon"

#: top-level parts of surgeon, lowest first; a module imports only from its own layer or below
LAYERS: dict[str, int] = {
    "errors": 0, "suggest": 0, "arch": 0, "allocator": 0, "version": 0,
    "settings": 1,
    "io": 2,
    "merge": 3, "step": 3, "inspection": 3,
    "eval": 4, "transplant": 4, "recipe": 4,
    "fusion": 5,
    "engine": 6,
    "api": 7, "cli_checks": 7,
    "cli": 8, "surgeon": 8,  # surgeon/__init__.py
    "__main__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "surgeon"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "surgeon":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    deps.add(sub if sub in mods else owner(target))
        deps.discard(mod)
        graph[mod] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "surgeon"


def test_the_graph_reader_sees_function_level_imports() -> None:
    g = _graph()
    assert "surgeon.merge.registry" in g["surgeon.recipe.load"]       # a function-level import
    assert "surgeon.merge.kernels.base" in g["surgeon.merge.method"]   # a module-level one


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (modules that import each other, directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_every_part_of_surgeon_has_a_layer() -> None:
    parts = {_part(m) for m in _modules()}
    assert parts <= set(LAYERS), f"add these to LAYERS and docs/architecture.md: {sorted(parts - set(LAYERS))}"


def test_layers_import_only_downward() -> None:
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _part(mod), _part(dep)
            if LAYERS.get(b, -1) > LAYERS.get(a, 99):
                bad.append(f"{mod} -> {dep} ({a} is below {b})")
    assert not bad, "lower layers import higher ones:\n" + "\n".join(sorted(bad))


def test_io_and_merge_import_nothing_from_the_step_libraries_or_engine() -> None:
    for mod, deps in _graph().items():
        if _part(mod) in ("io", "merge", "step"):
            assert not {_part(d) for d in deps} & {"engine", "transplant", "fusion", "recipe", "api", "cli"}, mod
        if _part(mod) in ("transplant", "fusion"):
            assert not {_part(d) for d in deps} & {"engine", "api", "cli"}, mod


def test_merge_kernels_do_not_import_the_methods() -> None:
    """merge/ on two floors: kernels are below methods (shared arithmetic lives in merge/arith.py)."""
    for mod, deps in _graph().items():
        if mod.startswith("surgeon.merge.kernels") or mod.startswith("surgeon.merge.select"):
            assert not any(d.startswith("surgeon.merge.methods") or d == "surgeon.merge.registry" for d in deps), mod


def test_ruff_is_clean_on_surgeon() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "surgeon"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
