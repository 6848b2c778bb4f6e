"""The shape of the package, as its imports give it (docs/design.md, "Modules"): no import
circle, the client's side and the target's side import nothing of each other, and the on-media
format knows no network. Every import counts: at the top, inside a function (a lazy import is
still a dependency) and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pmemblk"

#: What runs in the plugin's or attach's process, and what runs in the target's.
CLIENT_SIDE = ("client", "blockmap", "flush", "transport", "plugin_instance", "nbdkit_plugin",
               "attach", "attachments", "install", "status")
TARGET_SIDE = ("target", "session", "service", "servers")
#: The on-media format: the region header, atomic blocks, the mapping of the region.
MEDIA = ("layout", "atomicblocks", "pmem")
#: What moves bytes over a network, or speaks the wire protocol.
NETWORK = ("transport", "servers", "rdma", "endpoint", "protocol", "auth", "control", "reactor",
           "unixsock", "address", "client", "blockmap")


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Module name (relative to the package, "" for the package itself) → its file."""
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports, by name (as ``modules`` names them)."""
    mods = modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        here = name.split(".") if name else []
        if path.name != "__init__.py":
            here = here[:-1]  # a module's relative imports start at its package
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name.removeprefix("pmemblk").lstrip(".") for a in node.names
                           if a.name == "pmemblk" or a.name.startswith("pmemblk.")]
            elif isinstance(node, ast.ImportFrom):
                absolute = node.module or ""
                if node.level:
                    if node.level - 1 > len(here):
                        continue
                    base = here[:len(here) - node.level + 1] + ([absolute] if absolute else [])
                elif absolute == "pmemblk" or absolute.startswith("pmemblk."):
                    rest = absolute.removeprefix("pmemblk").lstrip(".")
                    base = [rest] if rest else []
                else:
                    continue
                module = ".".join(base)
                for alias in node.names:  # `from . import x` names a module; else an attribute
                    sub = f"{module}.{alias.name}" if module else alias.name
                    targets.append(sub if sub in mods else module)
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def within(name: str, areas: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in areas)


def crossings(graph: dict[str, set[str]], side: tuple[str, ...],
              forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in graph.items() if within(m, side)
                  for d in deps if within(d, forbidden))


GRAPH = imports()


def test_no_import_circle() -> None:
    assert cycles(GRAPH) == []


def test_the_client_side_imports_nothing_of_the_target_side() -> None:
    assert crossings(GRAPH, CLIENT_SIDE, TARGET_SIDE) == []


def test_the_target_side_imports_nothing_of_the_client_side() -> None:
    assert crossings(GRAPH, TARGET_SIDE, CLIENT_SIDE) == []


def test_the_media_layer_knows_no_network() -> None:
    assert crossings(GRAPH, MEDIA, NETWORK) == []


def test_every_area_named_exists() -> None:
    """A renamed module must not make a rule above silently true."""
    names = set(modules())
    for area in CLIENT_SIDE + TARGET_SIDE + MEDIA + NETWORK:
        assert any(within(n, (area,)) for n in names), area


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checks above are only as good as the walk: a circle made by a lazy import inside a
    function, and one under TYPE_CHECKING, are both found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n")
    (pkg / "c.py").write_text("from pmemblk import d\n")
    (pkg / "d.py").write_text("import pmemblk.c\n")
    graph = imports(pkg)
    assert graph["a"] == {"sub.b"} and graph["sub.b"] == {"a"}
    assert graph["c"] == {"d"} and graph["d"] == {"c"}
    assert cycles(graph) == [["a", "sub.b"], ["c", "d"]]


#: Where a flush method is a name: the wire (protocol), what each guarantees (durability), the
#: policy objects (flush). Everywhere else a method or its FUA step is an object.
FLUSH_NAMES = {"apm", "gpspm", "native", "barrier", "commit", "flush"}
NAMED_HERE = ("protocol", "durability", "flush")


def name_comparisons(package: Path = PACKAGE) -> list[str]:
    """Every ``x == "gpspm"`` or ``x in ("apm", ...)`` with a flush method's or FUA step's
    name, outside the modules allowed to know them (``"flush" in status``, a key looked up,
    is not one)."""
    def named(node: ast.expr) -> bool:
        values = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
        return any(isinstance(v, ast.Constant) and v.value in FLUSH_NAMES for v in values)

    found = []
    for name, path in modules(package).items():
        if within(name, NAMED_HERE):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(
                    named(right) or (isinstance(op, ast.Eq | ast.NotEq) and named(left))
                    for op, left, right in zip(node.ops, [node.left, *node.comparators[:-1]],
                                               node.comparators, strict=True)):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_flush_method_is_compared_by_name() -> None:
    assert name_comparisons() == []


def test_the_name_search_finds_a_comparison(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text('def f(step, st):\n'
                                   '    return (step == "flush" or step in ("apm",)\n'
                                   '            or "commit" in st)\n')
    (pkg / "flush.py").write_text('def g(m):\n    return m == "gpspm"\n')  # allowed there
    assert name_comparisons(pkg) == ["client.py:2", "client.py:2"]  # == and in: not "in st"


def test_no_module_is_a_god_module() -> None:
    """STYLE.md: a module over ~600 lines holds more than one concept (issue 25 split
    target.py, atomicblocks.py, rdma.py and attach.py when they had grown past it)."""
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: lines for n, lines in long.items() if lines > 620} == {}
