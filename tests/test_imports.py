"""The import drawing of obim/, read from the source with `ast` (nothing is imported): no circle among obim's
modules, and the merging library imports nothing of obim outside itself (the package `obim` above it included).

Every import statement counts, at module level or inside a function (and under `if TYPE_CHECKING:`): a lazy import
still draws an arrow. `from pkg import name` is an arrow to pkg.name where that is a module, else to pkg; relative
imports are resolved. Importing a.b.c runs a/__init__ and a/b/__init__ too, but only the module named is an arrow:
otherwise every module would point at its own package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "obim.merging"  # imports nothing of obim outside itself

Sources = dict[str, tuple[str, bool]]  # module -> (its source, whether it is a package's __init__)
Graph = dict[str, set[str]]  # module -> the obim modules it imports


def source_tree(root: Path, top: str = "obim") -> Sources:
    """Every module under root/top by its dotted name."""
    out: Sources = {}
    for path in sorted((root / top).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if package else parts)
        out[name] = (path.read_text(encoding="utf-8"), package)
    return out


def _known(name: str, modules: Sources) -> str | None:
    """The module `name`, or the longest of its parents that is one (None outside the set)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _base(module: str, package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute name `from ... import` reads from in `module` (None for a relative import above the top)."""
    if node.level == 0:
        return node.module
    parts = (module if package else module.rpartition(".")[0]).split(".")
    if node.level - 1 >= len(parts):
        return None
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(modules: Sources) -> Graph:
    """Each module's arrows to the modules of the set that it imports."""
    graph: Graph = {}
    for name, (source, package) in modules.items():
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(source, filename=name)):
            if isinstance(node, ast.Import):
                targets.update(_known(a.name, modules) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, package, node)
                if base is None:
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in modules else _known(base, modules))
        graph[name] = {t for t in targets if t is not None}
    return graph


def tangles(graph: Graph) -> list[set[str]]:
    """The strongly connected components that hold a circle (Tarjan's), in name order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:  # recursive: the obim tree is far shallower than the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or v not in comp:
                comp.add(stack.pop())
            on_stack.difference_update(comp)
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found, key=min)


def circle(graph: Graph, comp: set[str]) -> list[str]:
    """A shortest circle in the component through its first module, that module first and last."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, inside the component: a circle is always found
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in {sorted(comp)}")


def cycles(graph: Graph) -> list[list[str]]:
    """One circle per component that holds any."""
    return [circle(graph, comp) for comp in tangles(graph)]


def describe(graph: Graph) -> str:
    lines = []
    for comp in tangles(graph):
        c = circle(graph, comp)
        more = f" (one of the circles among {', '.join(sorted(comp))})" if len(comp) > len(c) - 1 else ""
        lines.append(" -> ".join(c) + more)
    return "\n".join(lines)


def upward(graph: Graph, library: str = LIBRARY) -> list[tuple[str, str]]:
    """The library's arrows to modules outside it."""

    def inside(m: str) -> bool:
        return m == library or m.startswith(library + ".")

    return sorted((m, t) for m, ts in graph.items() if inside(m) for t in ts if not inside(t))


# ------------------------------------------------------------------------------------------------ obim itself


def test_no_import_cycle_under_obim():
    found = describe(import_graph(source_tree(ROOT)))
    assert not found, "import cycles under obim/:\n" + found


def test_merging_imports_nothing_of_obim_outside_itself():
    found = upward(import_graph(source_tree(ROOT)))
    assert not found, f"{LIBRARY} imports outside itself:\n" + "\n".join(f"{m} -> {t}" for m, t in found)


# ------------------------------------------------------------------------------------------ the checker itself


def test_the_checker_finds_a_cycle_through_lazy_and_relative_imports():
    graph = import_graph(
        {
            "p": ("", True),
            "p.a": ("from . import b\n", False),  # a module, by its name in a from-import
            "p.b": ("def f():\n    from .c import x\n    return x\n", False),  # inside a function
            "p.c": ("import p.a as a\n", False),
            "p.d": ("import p.c\n", False),  # leads into the circle, not part of it
        }
    )
    assert graph == {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.c"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert cycles({"x": {"x"}}) == [["x", "x"]]
    tangled = {"a": {"b"}, "b": {"a", "c"}, "c": {"a"}}  # two circles in one component: both named
    assert describe(tangled) == "a -> b -> a (one of the circles among a, b, c)"


def test_the_checker_draws_no_false_cycle():
    modules = {
        "p": ("from . import a\nfrom .a import NAME\n", True),  # the package re-exports its module
        "p.a": ("import p.b\nfrom p.c import thing\nimport json\n", False),  # no arrow to p implied
        "p.b": ("from .c import thing\nfrom .. import outside\n", False),  # `from ..`: above the set, ignored
        "p.c": ("import os\n", False),
        "p.q": ("", True),
        "p.q.d": ("from . import e\nfrom .. import c\nfrom ..b import f\n", False),
        "p.q.e": ("import p.q.nothing_here\nfrom p.q import CONSTANT\n", False),  # no such modules: p.q
    }
    graph = import_graph(modules)
    assert graph == {
        "p": {"p.a"},
        "p.a": {"p.b", "p.c"},
        "p.b": {"p.c"},
        "p.c": set(),
        "p.q": set(),
        "p.q.d": {"p.q.e", "p.c", "p.b"},
        "p.q.e": {"p.q"},
    }
    assert cycles(graph) == []


def test_the_checker_finds_the_library_importing_above_itself():
    graph = import_graph(
        {
            "obim": ("from .merging.merge import merge\n", True),
            "obim.merging": ("from .merge import merge\n", True),
            "obim.merging.merge": ("def f():\n    from ..bench import judge\nfrom .errors import E\n", False),
            "obim.merging.errors": ("from obim import __version__\nimport torch\n", False),
            "obim.bench": ("", True),
            "obim.bench.judge": ("from obim.merging.merge import merge\n", False),  # downward: fine
        }
    )
    assert upward(graph) == [("obim.merging.errors", "obim"), ("obim.merging.merge", "obim.bench.judge")]
    assert upward({"obim.merging_extra": {"obim.bench"}}) == []  # a sibling named alike is not the library
