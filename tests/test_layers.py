"""The package's import graph: no cycles, imports go down the layer order, one name per module.

The layer order is read from the table in ARCHITECTURE.md ("## Which way imports go"), so the
document and this test cannot drift: a package gets its rank there, and a rank that changes
changes in one place. A module may import modules of its own top-level package and of packages
of a lower rank; packages of the same rank do not import each other.

What counts as an import: every ``import`` / ``from ... import`` statement in the file, also
inside functions (a lazy import is still a dependency). What does not: imports under
``if TYPE_CHECKING:`` (never run), the root package's lazy re-exports (a string table in
``vitviz/__init__.py``, loaded on attribute access), and the root aliases of old paths
(``vitviz/hooks.py`` ..., modules that replace themselves in ``sys.modules``; nothing inside the
package may import them).

The one exception, named: a data type's notebook display (``_repr_png_`` / ``_repr_html_`` in
``vitviz/types.py``) draws itself with ``vitviz.analyze`` and ``vitviz.render``, imported inside
that method. The data types stay importable without either, and nothing else in ``types.py``
may import upward.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the named exception: (importing module, method names, packages it may import there)
DISPLAY_EXCEPTION = ("vitviz.types", frozenset({"_repr_png_", "_repr_html_"}),
                     frozenset({"vitviz.analyze", "vitviz.render"}))


@dataclass(frozen=True)
class Edge:
    importer: str  # dotted module name
    target: str  # the vitviz module imported (longest existing prefix of what the statement names)
    where: str  # "path:line" of the statement
    exempt: bool  # the named display exception


# ---- reading the tree ----------------------------------------------------------------------------

def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_alias(path: Path) -> bool:
    """A module that replaces itself in ``sys.modules`` (``sys.modules[__name__] = ...``)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if (isinstance(t, ast.Subscript) and ast.unparse(t.value) == "sys.modules"
                        and ast.unparse(t.slice) == "__name__"):
                    return True
    return False


def modules(root: Path) -> dict[str, Path]:
    """Every module and package of ``root/vitviz``: dotted name -> file."""
    return {_module_name(root, p): p for p in sorted((root / "vitviz").rglob("*.py"))
            if "__pycache__" not in p.parts}


def aliases(root: Path) -> set[str]:
    """The root package's alias modules (old paths kept for users)."""
    return {_module_name(root, p) for p in sorted((root / "vitviz").glob("*.py")) if _is_alias(p)}


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _statements(tree: ast.AST):
    """(import node, names of the enclosing functions) for every import that runs; the bodies of
    ``if TYPE_CHECKING:`` are left out (their ``else:`` runs, so it is kept)."""
    def visit(node: ast.AST, funcs: tuple[str, ...]):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, funcs
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from visit(child, funcs)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs = funcs + (node.name,)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, funcs)

    yield from visit(tree, ())


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the tree (None outside vitviz)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def top_package(module: str, ranks: dict[str, int]) -> str | None:
    """The entry of the layer table that holds ``module`` (its longest prefix in the table)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in ranks:
            return candidate
    return None


def import_edges(root: Path) -> list[Edge]:
    """Every import from one vitviz module to another, as the statements name them."""
    known = modules(root)
    skipped = aliases(root) | {"vitviz"}  # the aliases and the root's lazy table are not code that runs below
    importer_of, methods, allowed = DISPLAY_EXCEPTION
    edges = []
    for importer, path in known.items():
        if importer in skipped:
            continue
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        for node, funcs in _statements(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            else:
                base = package[: len(package) - node.level + 1] if node.level else []
                stem = ".".join(base + (node.module.split(".") if node.module else []))
                named = [f"{stem}.{a.name}" for a in node.names]
            for name in named:
                target = _resolve(name, known)
                if target is None or target == importer:
                    continue
                exempt = (importer == importer_of and bool(funcs) and funcs[-1] in methods
                          and any(target == p or target.startswith(p + ".") for p in allowed))
                where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
                edges.append(Edge(importer, target, where, exempt))
    return edges


# ---- the checks --------------------------------------------------------------------------------

def find_cycles(edges: list[Edge]) -> list[str]:
    """One shortest cycle per strongly connected group of modules, each step with its file:line."""
    graph: dict[str, dict[str, str]] = {}
    for e in edges:
        if not e.exempt:
            graph.setdefault(e.importer, {}).setdefault(e.target, e.where)
            graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for group in sorted(groups):
        members, start = set(group), group[0]
        prev: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:  # breadth first inside the group, to the first module that imports start back
            v = queue.popleft()
            if start in graph[v]:
                break
            for w in sorted(graph[v]):
                if w in members and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path: list[str] = []
        step: str | None = v
        while step is not None:
            path.append(step)
            step = prev[step]
        path.reverse()  # start ... v, and v imports start
        path.append(start)
        steps = set(zip(path, path[1:]))
        others = sorted((a, b) for a in group for b in graph[a] if b in members and (a, b) not in steps)
        lines = [" -> ".join(path)] + [f"    {graph[a][b]}: {a} imports {b}" for a, b in zip(path, path[1:])]
        lines += [f"    (and in the same knot) {graph[a][b]}: {a} imports {b}" for a, b in others]
        found.append("\n".join(lines))
    return found


def layer_violations(edges: list[Edge], ranks: dict[str, int], alias_names: set[str]) -> list[str]:
    """Imports that go up the order, sideways between packages of one rank, into the root package,
    into an alias of an old path, or from a module the table does not place."""
    found = []
    for e in edges:
        if e.exempt:
            continue
        if e.target in alias_names:
            found.append(f"{e.where}: {e.importer} imports {e.target}, an alias of an old path; "
                         "import the module it names")
            continue
        if e.target == "vitviz":
            found.append(f"{e.where}: {e.importer} imports the root package vitviz, which sits on top "
                         "of every layer; import the module that defines the name")
            continue
        src, dst = top_package(e.importer, ranks), top_package(e.target, ranks)
        if src is None or dst is None:
            found.append(f"{e.where}: {e.importer if src is None else e.target} has no rank in "
                         "ARCHITECTURE.md's layer table; add its package there")
            continue
        if src == dst:
            continue
        if ranks[src] < ranks[dst]:
            found.append(f"{e.where}: {e.importer} (rank {ranks[src]}, {src}) imports {e.target} "
                         f"(rank {ranks[dst]}, {dst}): upward")
        elif ranks[src] == ranks[dst]:
            found.append(f"{e.where}: {e.importer} imports {e.target}: {src} and {dst} share rank "
                         f"{ranks[src]} and do not import each other")
    return found


def layer_table(text: str) -> dict[str, int]:
    """The ranks of ARCHITECTURE.md: the fenced block under "## Which way imports go", one package a
    line, ``RANK  vitviz.PACKAGE  its job``."""
    section = text.split("\n## Which way imports go\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    ranks = {}
    for line in block.splitlines():
        m = re.match(r"\s*(\d+)\s+(vitviz(?:\.\w+)?)\s+\S", line)
        if m:
            assert m.group(2) not in ranks, f"{m.group(2)} is ranked twice in ARCHITECTURE.md"
            ranks[m.group(2)] = int(m.group(1))
    return ranks


# ---- the tree as it is ---------------------------------------------------------------------------

def _ranks() -> dict[str, int]:
    return layer_table((ROOT / "ARCHITECTURE.md").read_text())


def test_the_layer_table_places_every_part_of_the_package():
    ranks = _ranks()
    assert len(ranks) >= 14 and ranks["vitviz.errors"] == 0 and max(ranks.values()) == ranks["vitviz.cli"]
    skipped = aliases(ROOT)
    parts = {f"vitviz.{p.stem}" for p in (ROOT / "vitviz").iterdir()
             if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())}
    parts -= skipped
    assert sorted(parts - set(ranks)) == [], "give these a rank in ARCHITECTURE.md's layer table"
    assert sorted(set(ranks) - parts) == [], "ARCHITECTURE.md ranks what the tree lacks"


def test_the_aliases_of_old_paths_are_the_known_ones():
    # an alias is skipped by the graph, so the set of them is pinned: a new one is a decision
    assert aliases(ROOT) == {"vitviz.hooks", "vitviz.textmaps", "vitviz.sanity", "vitviz.perturbation",
                             "vitviz.faithfulness", "vitviz.captioning", "vitviz.engine", "vitviz.map_writer",
                             "vitviz.metrics"}


def test_no_import_cycles():
    cycles = find_cycles(import_edges(ROOT))
    assert not cycles, "import cycles (break each at one of its steps):\n" + "\n".join(cycles)


def test_imports_go_down_the_layer_order():
    found = layer_violations(import_edges(ROOT), _ranks(), aliases(ROOT))
    assert not found, "imports against ARCHITECTURE.md's layer order:\n" + "\n".join(found)


def test_the_display_exception_is_the_only_one_and_it_is_narrow():
    exempt = [e for e in import_edges(ROOT) if e.exempt]
    assert {e.importer for e in exempt} <= {"vitviz.types"}
    assert all(e.target.startswith(("vitviz.analyze", "vitviz.render")) for e in exempt)


# ---- the checker itself, on a tiny tree ----------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FAKE_RANKS = {"vitviz.errors": 0, "vitviz.types": 1, "vitviz.analyze": 2, "vitviz.render": 2, "vitviz.models": 3}


def test_the_checker_finds_a_cycle_and_upward_and_sideways_imports(tmp_path):
    _tree(tmp_path, {
        "vitviz/__init__.py": "from ._version import v\n_EXPORTS = {'rollout': 'vitviz.analyze'}\n",
        "vitviz/errors.py": "",
        "vitviz/old.py": "import sys\nfrom . import models\nsys.modules[__name__] = models\n",
        "vitviz/types.py": (
            "from typing import TYPE_CHECKING\nfrom .errors import E\n"
            "if TYPE_CHECKING:\n    from .models import VisionModel\nelse:\n    from .render.fig import png\n"
            "class A:\n    def _repr_png_(self):\n        from .render.fig import png\n        from .models import m\n"
            "    def show(self):\n        from .render.fig import png\n"),
        "vitviz/analyze/__init__.py": "from .roll import rollout\n",
        "vitviz/analyze/roll.py": "from ..errors import E\n\ndef f():\n    from ..models._load import x\n",
        "vitviz/render/__init__.py": "",
        "vitviz/render/fig.py": "",
        "vitviz/render/side.py": "from ..analyze import rollout\n",
        "vitviz/models/__init__.py": "from ._load import x\nfrom .. import old\n",
        "vitviz/models/_load.py": "from . import _conv\nimport vitviz\n",
        "vitviz/models/_conv.py": "import vitviz.models._load\n",
    })
    edges = import_edges(tmp_path)
    assert all(not e.importer == "vitviz" and not e.importer == "vitviz.old" for e in edges)
    assert find_cycles(edges) == [
        "vitviz.models._conv -> vitviz.models._load -> vitviz.models._conv\n"
        "    vitviz/models/_conv.py:1: vitviz.models._conv imports vitviz.models._load\n"
        "    vitviz/models/_load.py:1: vitviz.models._load imports vitviz.models._conv"]
    assert layer_violations(edges, FAKE_RANKS, aliases(tmp_path)) == [
        "vitviz/analyze/roll.py:4: vitviz.analyze.roll (rank 2, vitviz.analyze) imports vitviz.models._load "
        "(rank 3, vitviz.models): upward",
        "vitviz/models/__init__.py:2: vitviz.models imports vitviz.old, an alias of an old path; "
        "import the module it names",
        "vitviz/models/_load.py:2: vitviz.models._load imports the root package vitviz, which sits on top "
        "of every layer; import the module that defines the name",
        "vitviz/render/side.py:1: vitviz.render.side imports vitviz.analyze: vitviz.render and vitviz.analyze "
        "share rank 2 and do not import each other",
        "vitviz/types.py:6: vitviz.types (rank 1, vitviz.types) imports vitviz.render.fig (rank 2, "
        "vitviz.render): upward",  # the else: branch of TYPE_CHECKING runs
        "vitviz/types.py:10: vitviz.types (rank 1, vitviz.types) imports vitviz.models (rank 3, vitviz.models): "
        "upward",  # _repr_png_ may import analyze / render only
        "vitviz/types.py:12: vitviz.types (rank 1, vitviz.types) imports vitviz.render.fig (rank 2, "
        "vitviz.render): upward",  # outside the display methods
    ]


def test_the_checker_leaves_out_type_checking_and_the_display_exception(tmp_path):
    _tree(tmp_path, {
        "vitviz/errors.py": "",
        "vitviz/types.py": (
            "import typing\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .models import VisionModel\n"
            "if typing.TYPE_CHECKING:\n    from .models import wrap\n"
            "class A:\n    def _repr_png_(self):\n        from .render.fig import png\n        from .analyze import r\n"
            "    def _repr_html_(self):\n        from .render import fig\n"),
        "vitviz/analyze/__init__.py": "from ..types import A\n",
        "vitviz/render/__init__.py": "",
        "vitviz/render/fig.py": "from ..types import A\n",
        "vitviz/models/__init__.py": "from ..types import A\n",
    })
    edges = import_edges(tmp_path)
    assert find_cycles(edges) == []  # types -> render.fig -> types runs only when a notebook draws it
    assert layer_violations(edges, FAKE_RANKS, aliases(tmp_path)) == []
    assert sorted((e.target, e.where) for e in edges if e.exempt) == [
        ("vitviz.analyze", "vitviz/types.py:10"), ("vitviz.render.fig", "vitviz/types.py:12"),
        ("vitviz.render.fig", "vitviz/types.py:9")]
    assert not any(e.target == "vitviz.models" for e in edges)


def test_the_layer_table_is_parsed_from_its_section():
    text = ("# x\n\n## Which way imports go\n\n```\nrank  package  job\n 0   vitviz.errors   typed errors\n"
            " 2   vitviz.analyze  pure\n12   vitviz.cli      the command\n```\n\n```\n 5  vitviz.other  no\n```\n")
    assert layer_table(text) == {"vitviz.errors": 0, "vitviz.analyze": 2, "vitviz.cli": 12}


# ---- one name per module -------------------------------------------------------------------------

def duplicate_module_names(root: Path) -> list[str]:
    """Base names (a leading underscore stripped) held by more than one module or package of vitviz/,
    leaving out ``__init__``, the subcommand files of ``vitviz/cli/commands/`` (each is named after its
    command) and the root aliases of old paths (they carry the old names on purpose)."""
    pkg = root / "vitviz"
    skipped = {root / (name.replace(".", "/") + ".py") for name in aliases(root)}
    by_name: dict[str, list[str]] = {}
    for path in sorted(pkg.rglob("*")):
        if "__pycache__" in path.parts or path in skipped or path.name == "__init__.py":
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            name = path.name
        elif path.suffix == ".py":
            if path.parent == pkg / "cli" / "commands" and not path.stem.startswith("_"):
                continue
            name = path.stem
        else:
            continue
        by_name.setdefault(name.lstrip("_"), []).append(path.relative_to(root).as_posix())
    return [f"{name}: {', '.join(paths)}" for name, paths in sorted(by_name.items()) if len(paths) > 1]


def test_no_two_modules_share_a_name():
    found = duplicate_module_names(ROOT)
    assert not found, "a module name appears once in the tree:\n" + "\n".join(found)


def test_the_name_check_strips_the_underscore_and_skips_commands(tmp_path):
    _tree(tmp_path, {
        "vitviz/__init__.py": "", "vitviz/analyze/__init__.py": "", "vitviz/analyze/posembed.py": "",
        "vitviz/models/__init__.py": "", "vitviz/models/_posembed.py": "",
        "vitviz/cli/__init__.py": "", "vitviz/cli/commands/__init__.py": "",
        "vitviz/cli/commands/cls.py": "", "vitviz/analyze/cls.py": "",
        "vitviz/render/__init__.py": "", "vitviz/render/models.py": "",
        "vitviz/old.py": "import sys\nfrom .analyze import posembed\nsys.modules[__name__] = posembed\n",
        "vitviz/analyze/old.py": "",
    })
    assert duplicate_module_names(tmp_path) == [
        "models: vitviz/models, vitviz/render/models.py",  # a package counts too
        "posembed: vitviz/analyze/posembed.py, vitviz/models/_posembed.py",
    ]


def shadowed_submodules() -> list[str]:
    """Package attributes that hide a submodule of the same name (``vitviz.render.overlay`` the
    function over ``vitviz/render/overlay.py``): then ``import vitviz.render.overlay as m`` gives the
    function and ``monkeypatch.setattr("vitviz.render.overlay.x", ...)`` patches nothing."""
    import importlib
    import pkgutil

    found = []
    todo = ["vitviz"]
    while todo:
        pkg = importlib.import_module(todo.pop())
        for info in pkgutil.iter_modules(pkg.__path__):
            full = f"{pkg.__name__}.{info.name}"
            if full in aliases(ROOT) or info.name == "__main__":  # __main__ runs the command on import
                continue
            mod = importlib.import_module(full)
            attr = getattr(pkg, info.name, mod)
            if attr is not mod:
                found.append(f"{full} is also a {type(attr).__name__} exported by {pkg.__name__}")
            if info.ispkg:
                todo.append(full)
    return found


def test_no_package_exports_a_name_over_its_own_submodule():
    found = shadowed_submodules()
    assert not found, "rename the module (a package never shares its name with what it exports):\n" + \
        "\n".join(found)
