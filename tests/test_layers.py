"""The package's import graph: arrows point down only, and there are no cycles (issue 12).

Every ``.py`` file of ``ufgir_cli`` is read with ``ast`` and every import counts: module level,
inside function bodies (a lazy import is still a dependency, it only runs later) and under
``TYPE_CHECKING``; relative and absolute alike. Nothing is imported, so the test is fast and
sees what the code says, not what one run happened to load.

Layers, top to bottom; a module may import its own package and anything strictly lower:

    cli (+ __main__, and the package root's lazy API)
    reproduce (a grid of sweeps)
    ship, sweep
    engine
    analysis, viz
    model, data
    recipe, methods, geometry, io, errors, paths

Siblings on one level do not import each other (analysis and viz, model and data, ship and sweep
stay independent; nothing needs otherwise), except on the bottom level: those are leaves that
build on one another (``recipe`` raises ``errors`` and reads ``paths``), and the cycle check still
guards them.

The package root is two things. Its function bodies are the public API (``ufgir_cli.load_run``)
and sit at the top, free to import the model. Its module body defines plain constants
(``__version__``) and sits at the bottom, so any module may read ``from .. import __version__``;
the layer check below keeps that body from importing anything higher than the bottom level.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ufgir_cli

PKG_DIR = Path(ufgir_cli.__file__).parent
ROOT = "ufgir_cli"
ROOT_API = "ufgir_cli (lazy API)"  # the root's function bodies: a node of its own

LEVELS: tuple[tuple[str, ...], ...] = (
    ("cli", "api"),
    ("reproduce",),
    ("ship", "sweep"),
    ("engine",),
    ("analysis", "viz"),
    ("model", "data"),
    ("recipe", "recipe_sections", "recipe_docs", "methods", "geometry", "io", "errors", "paths", "cores", "root"),
)
SIBLINGS_MAY_IMPORT = {len(LEVELS) - 1}  # only the bottom level's leaves
LEVEL_OF = {layer: i for i, names in enumerate(LEVELS) for layer in names}
CLI_ONLY = ("typer", "rich")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}


def layer_of(module: str) -> str:
    """The top-level package or module of ``ufgir_cli`` that ``module`` belongs to: its layer."""
    if module == ROOT_API:
        return "api"
    if module == ROOT:
        return "root"
    unit = module.split(".")[1]
    return "cli" if unit == "__main__" else unit


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a ufgir_cli module, or the top-level name of an outside package
    line: int

    @property
    def internal(self) -> bool:
        return self.imported == ROOT or self.imported.startswith(ROOT + ".") or self.imported == ROOT_API


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> Iterator[Import]:
    """Every import in ``module``, as the ufgir_cli module it loads or the outside package's name.

    ``from X import name`` loads ``X.name`` when that is a module, else ``X``. Imports inside the
    package root's functions are the lazy API's, not the root body's.
    """
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), str(MODULES[module]))
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
    for node in ast.walk(tree):
        importer = ROOT_API if module == ROOT and id(node) in in_function else module
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                yield Import(importer, name if name.startswith(ROOT) else name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            if base != ROOT and not base.startswith(ROOT + "."):
                yield Import(importer, base.split(".")[0], node.lineno)
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(importer, sub if sub in MODULES else base, node.lineno)


IMPORTS: list[Import] = [i for m in MODULES for i in imports_of(m)]
INTERNAL: list[Import] = [i for i in IMPORTS if i.internal and i.imported != i.importer]


def test_every_module_has_a_layer_and_every_import_a_module():
    unknown = sorted({m for m in MODULES if layer_of(m) not in LEVEL_OF})
    assert not unknown, f"modules outside every layer (add their package to LEVELS): {unknown}"
    missing = sorted({f"{i.importer}:{i.line} imports {i.imported}" for i in INTERNAL
                      if i.imported not in MODULES and i.imported != ROOT_API})
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def _allowed(importer: str, imported: str) -> bool:
    a, b = layer_of(importer), layer_of(imported)
    if a not in LEVEL_OF or b not in LEVEL_OF:
        return a == b  # a module in no layer is reported by the first test
    la, lb = LEVEL_OF[a], LEVEL_OF[b]
    return a == b or lb > la or (lb == la and la in SIBLINGS_MAY_IMPORT)


def _below(layer: str) -> str:
    level = LEVEL_OF[layer]
    lower = [n for names in LEVELS[level + 1 :] for n in names]
    if level in SIBLINGS_MAY_IMPORT:
        lower = [n for n in LEVELS[level] if n != layer] + lower
    return ", ".join(lower) or "nothing"


def test_imports_point_down_only():
    bad = sorted({
        f"{i.importer} (line {i.line}) imports {i.imported}: {layer_of(i.importer)} may import only itself and "
        f"{_below(layer_of(i.importer))}, not {layer_of(i.imported)}"
        for i in INTERNAL if not _allowed(i.importer, i.imported)
    })
    assert not bad, f"{len(bad)} upward or sideways imports:\n" + "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_one_cycle(sorted(c)[0], set(c), edges) for c in components]


def _one_cycle(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    for v in queue:
        for w in sorted(edges.get(v, set()) & members):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for i in INTERNAL:
        edges.setdefault(i.importer, set()).add(i.imported)
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_below_cli_imports_typer_or_rich():
    bad = sorted({f"{i.importer} (line {i.line}) imports {i.imported}" for i in IMPORTS
                  if i.imported in CLI_ONLY and layer_of(i.importer) != "cli"})
    assert not bad, "typer and rich belong to cli only:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_from_package_imports():
    """The walk itself: a lazy import, ``from . import module`` and ``from .. import name``."""
    mods = {i.imported for i in IMPORTS if i.importer == "ufgir_cli.cli"}
    assert "ufgir_cli.cli.ship" in mods  # from . import ship as _ship
    assert any(i.importer == ROOT_API and i.imported == "ufgir_cli.model.checkpoint" for i in IMPORTS)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert not _allowed("ufgir_cli.model.vit", "ufgir_cli.engine.train")
    assert not _allowed("ufgir_cli.analysis.cost", "ufgir_cli.viz.figures")
    assert _allowed("ufgir_cli.recipe", "ufgir_cli.errors") and _allowed("ufgir_cli.data.download", ROOT)
