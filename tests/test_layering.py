"""The import graph of the project's code, read from its source (ast): no cycles, and no import up the floors.

Floors, lowest first: data and ops <- modeling <- objectives <- tasks and evaluation <- the trainer and
the run files <- the commands. A module may import its own floor and any lower one; imports inside
functions count too (a lazy import is still a dependency). Every module must be on a floor, so a new
one is placed deliberately.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

from tiny_config import REPO

PACKAGES = ("generative_recommenders", "ops")
SCRIPTS = ("main.py", "preprocess_public_data.py")
GR = "generative_recommenders"

# Module-name prefixes per floor, lowest first.
FLOORS = [
    [f"{GR}.config", f"{GR}.faults", f"{GR}.files", f"{GR}.precision", f"{GR}.cuda_graph", f"{GR}.progress"],  # used by all
    [f"{GR}.data", "ops"],
    [f"{GR}.modeling"],
    [f"{GR}.objectives"],
    [f"{GR}.tasks", f"{GR}.evaluation", f"{GR}.inference"],
    [f"{GR}.trainer", f"{GR}.runs", f"{GR}.tensorboard_log"],
    [f"{GR}.trained_run", f"{GR}.recommend", f"{GR}.export", f"{GR}.report", "main", "preprocess_public_data"],
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> Dict[str, Path]:
    """Module name -> file, for every module of the packages and the top-level scripts."""
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")] + [REPO / s for s in SCRIPTS]
    return {_module_name(p): p for p in files}


def _imported(node: ast.AST, importer: str, is_package: bool, modules: Set[str]) -> List[str]:
    """The project modules an import statement names (`from a import b` names a.b when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importer's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return found or ([base] if base in modules else [])


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {target for node in ast.walk(tree) for target in _imported(node, name, is_package, set(modules))
                       if target != name}
    return graph


def floor_of(module: str) -> Optional[int]:
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return sorted(f"{importer} (floor {floor_of(importer)}) imports {target} (floor {floor_of(target)})"
                  for importer, targets in graph.items() for target in targets
                  if None not in (floor_of(importer), floor_of(target)) and floor_of(target) > floor_of(importer))


def test_every_module_is_on_a_floor():
    unplaced = [m for m in project_modules() if m not in PACKAGES and floor_of(m) is None]
    assert not unplaced, f"add these modules to a floor in FLOORS: {unplaced}"


def test_no_import_cycles():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = upward_imports(import_graph(project_modules()))
    assert not upward, "imports up the floors:\n" + "\n".join(upward)


def test_the_checks_see_cycles_and_upward_imports():
    graph = {"ops.a": {f"{GR}.modeling.x"}, f"{GR}.modeling.x": {"ops.a"}}
    assert find_cycle(graph) == [f"{GR}.modeling.x", "ops.a", f"{GR}.modeling.x"]
    assert upward_imports(graph) == [f"ops.a (floor 1) imports {GR}.modeling.x (floor 2)"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
