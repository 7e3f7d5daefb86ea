"""No import cycles between tierkv's modules.

A cycle makes import order matter (a module half-loaded when its partner reads from it), and it
forces imports into function bodies to hide it; so every import counts here: module-level,
function-level and ``TYPE_CHECKING``-only alike, since each one is a dependency of the module
on the other. Edges are read statically with ``ast``, so the check needs no optional extras.

Only the named module is an edge: ``from tierkv.a.b import c`` depends on ``tierkv.a.b`` (or
on ``tierkv.a.b.c`` where that is a module), not on the packages ``tierkv`` and ``tierkv.a``
that Python also runs first. Those parent ``__init__`` runs happen for every submodule, so
counting them would make ``tierkv/__init__.py`` part of a cycle with any module it reaches.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tierkv"


def module_name(path: Path) -> str:
    """The dotted name of a source file under ``PACKAGE`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    """The absolute name a (possibly relative) ``from`` import names."""
    if level == 0:
        return module
    base = importer.split(".")
    # A module's level-1 import is relative to its package; a package's to itself.
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each tierkv module -> the tierkv modules it imports anywhere in its source."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, name, is_package)
                # ``from pkg import sub`` imports the submodule ``pkg.sub``; otherwise a name
                # defined in ``pkg`` itself.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the first module of ``component``, as a path back to it."""
    start = component[0]
    inside = set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & inside):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def all_modules() -> dict[str, Path]:
    """Every module of the installed-from-source ``tierkv`` package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def describe_cycles() -> list[str]:
    """One line per import cycle: its modules, and one shortest loop through them."""
    edges = import_edges(all_modules())
    return [
        f"{', '.join(c)}  (e.g. {' -> '.join(shortest_cycle(edges, c))})"
        for c in find_cycles(edges)
    ]


def test_checker_finds_a_function_level_cycle() -> None:
    # The checker itself: a cycle hidden in a function body still counts.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert shortest_cycle(edges, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_checker_reads_relative_and_submodule_imports(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg.a import f\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py"}
    modules |= {f"pkg.{m}": tmp_path / "pkg" / f"{m}.py" for m in "ab"}
    assert import_edges(modules) == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}


def test_no_import_cycles_in_tierkv() -> None:
    cycles = describe_cycles()
    assert not cycles, "import cycles between tierkv modules:\n" + "\n".join(cycles)


if __name__ == "__main__":  # python tests/test_import_layers.py: list the cycles
    print("\n".join(describe_cycles()) or "no import cycles")
