"""The engine's rooms and their order: a room imports only from itself and the rooms below it, at
module level and inside functions alike; no import loops; no module reaches into another's
underscore names; and the UI reaches the engine only through :mod:`engine.api`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"

# Lowest first. A module in room i may import rooms 0..i only.
ROOMS = ("core", "loading", "measure", "evaluation", "adapters", "surgery", "running", "tools")
TOP = {"engine", "engine.__main__", "engine.cli", "engine.api"}  # entry points, above every room


def _files(root: Path) -> dict[str, Path]:
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, tuple[str, ...], int, bool]]:
    """(module, imported names, line, at module level) for every import of a known module in the file,
    wherever it stands: module level, inside functions, under ``if TYPE_CHECKING``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            mod = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            names = tuple(a.name for a in node.names)
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
            if subs:
                found += [(s, (), node.lineno, id(node) in top_level) for s in subs]
                rest = tuple(n for n in names if f"{mod}.{n}" not in known)
                if rest and mod in known:
                    found.append((mod, rest, node.lineno, id(node) in top_level))
            elif mod in known:
                found.append((mod, names, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, (), node.lineno, id(node) in top_level) for a in node.names if a.name in known]
    return found


def module_graph(root: Path = ENGINE, module_level_only: bool = False) -> dict[str, set[str]]:
    files = _files(root)
    known = set(files)
    return {
        name: {m for m, _, _, top in imports_of(path, name, known) if top or not module_level_only} - {name}
        for name, path in files.items()
    }


def rank(module: str) -> int:
    if module in TOP:
        return len(ROOMS)
    room = module.split(".")[1]
    assert room in ROOMS, f"{module} is in no room: put it in one of {ROOMS} (or make it an entry point)"
    return ROOMS.index(room)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if rank(b) > rank(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    pkg = tmp_path / "engine"
    for room in ("core", "running"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "running" / "runner.py").write_text("X = 1\n")
    (pkg / "core" / "low.py").write_text("def f():\n    from ..running.runner import X\n    return X\n")
    graph = module_graph(pkg)
    assert graph["engine.core.low"] == {"engine.running.runner"}
    assert upward_imports(graph) == ["engine.core.low -> engine.running.runner"]
    assert module_graph(pkg, module_level_only=True)["engine.core.low"] == set()


def test_every_engine_module_is_in_a_room():
    graph = module_graph()
    assert len(graph) > 60
    for name in graph:
        rank(name)
    assert not [p for p in ENGINE.glob("*.py") if f"engine.{p.stem}" not in TOP and p.stem != "__init__"]


def test_no_room_imports_a_room_above_it_not_even_inside_a_function():
    assert upward_imports(module_graph()) == []


def test_engine_has_no_module_level_import_loop():
    graph = module_graph(module_level_only=True)
    assert "engine.running.context" in graph and "engine.running.runner" in graph
    assert cycles(graph) == []


def test_tool_context_does_not_import_the_registry_or_the_runner():
    graph = module_graph()
    assert not graph["engine.running.context"] & {"engine.running.registry", "engine.running.runner"}
    tools = [m for m in graph if m.startswith("engine.tools.")]
    assert tools and all("engine.running.runner" not in graph[m] for m in tools)


def test_no_module_imports_another_modules_underscore_names():
    files = _files(ENGINE)
    known = set(files)
    bad = [
        f"{name}:{line} imports {n} from {mod}"
        for name, path in files.items()
        for mod, names, line, _ in imports_of(path, name, known)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert bad == []


def test_the_ui_reaches_the_engine_only_through_its_api():
    known = set(_files(ENGINE)) | {"engine"}
    outside = [
        ROOT / "app.py",
        *(ROOT / "ui").rglob("*.py"),
        *(ROOT / "pages").rglob("*.py"),
        *(ROOT / "viz").rglob("*.py"),
    ]
    bad = []
    for path in outside:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("engine")
            ):
                ok = node.module == "engine.api" or (
                    node.module == "engine" and [a.name for a in node.names] == ["api"]
                )
                if not ok:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] == "engine" and a.name in known
                ]
    assert bad == []
