"""The project packages import each other without cycles.

Every `import` / `from ... import` statement in the packages, at module level and inside
functions alike, that resolves to a project module is an edge of the graph: a lazy import
inside a function still makes the importer depend on the imported module, and a cycle
through it is the kind that breaks as soon as someone moves the import to the top. Only
imports under `if TYPE_CHECKING:` are left out: they never run. The test fails on a
cycle and prints it.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "experts", "distill", "pipeline", "rewards")


def project_modules(root: pathlib.Path = ROOT, packages=PACKAGES) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _base_of(module: str, path: pathlib.Path, level: int, name: str | None) -> str:
    """Absolute dotted name that `from <level dots><name> import ...` in `module` names."""
    if level == 0:
        return name or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join(package + ([name] if name else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST, type_only: bool = False):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks (their `else` runs);
    with `type_only`, those bodies too."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node) and not type_only:
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: pathlib.Path, known: set[str], type_only: bool = False) -> set[str]:
    """Project modules that `module` imports anywhere in its file (module or function level;
    with `type_only`, under `if TYPE_CHECKING:` too)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path)), type_only):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(module, path, node.level, node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:  # `from pkg import submodule`
                    found.add(submodule)
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def import_graph(root: pathlib.Path = ROOT, packages=PACKAGES, type_only: bool = False) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    known = set(modules)
    return {name: imports_of(name, path, known, type_only) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
            elif colour.get(child, BLACK) == GREY:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour.get(child) == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_project_imports_have_no_cycle():
    graph = import_graph()
    assert len(graph) > 50, f"the walk found only {len(graph)} modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_type_only_imports_have_no_cycle_either():
    """Shared types sit below both their users (issue 36): `ExperimentConfig` in
    pipeline.config_schema, which config_paths and graph import downward, `TeacherRef` in
    distill.teacher_ref. A type-only cycle is a runtime cycle waiting for someone to need
    the type at run time."""
    cycle = find_cycle(import_graph(type_only=True))
    assert cycle is None, "import cycle through type-only imports: " + " -> ".join(cycle)


def test_the_walk_sees_lazy_relative_and_submodule_imports(tmp_path):
    # guards against a vacuous walk: each import spelling below makes an edge, and the
    # cycle they close is found
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")  # from package import submodule
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")  # lazy, relative
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")  # relative, two levels
    (pkg / "d.py").write_text("import os\nimport pkg.a\n")  # plain import; stdlib ignored
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.a"}
    assert graph["pkg.e"] == set()  # TYPE_CHECKING imports never run
    assert import_graph(tmp_path, ("pkg",), type_only=True)["pkg.e"] == {"pkg.d"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None
