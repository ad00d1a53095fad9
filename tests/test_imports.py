"""No module reaches into another package's private modules or private names.

A module or name starting with ``_`` belongs to the subpackage that holds it (``vitviz.models._loader``
and ``_fit`` in ``vitviz.render.figures`` to ``vitviz.models`` and ``vitviz.render``;
``vitviz.batch._engine`` to ``vitviz.batch``); a private name of a top-level module belongs to that
module (``_as_tensor`` in ``vitviz.types``). Code elsewhere uses the public re-exports in that
package's ``__init__``. The private parts of the root package (``vitviz._util`` with ``files`` and
``extras``, ``vitviz._version``) are shared by all of it. The training scripts in ``tools/`` use the
package as any outside code does.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("vitviz", "benchmarks", "tools")


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path):
    """(line, absolute dotted target) for every import in the file, relative ones resolved."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            for a in node.names:
                yield node.lineno, target + [a.name]


def _owner(target: list[str]) -> list[str] | None:
    """The subpackage (or top-level module) a private target belongs to; None when nothing in it is private."""
    for i, part in enumerate(target):
        if part.startswith("_") and not part.startswith("__"):
            holder = target[:i]
            if len(holder) > 1 and not (ROOT.joinpath(*holder) / "__init__.py").exists():
                holder = holder[:-1] if len(holder) > 2 else holder  # a module: its subpackage owns it
            return holder
    return None


def cross_package_private_imports() -> list[str]:
    found = []
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            importer = _module_name(path)
            for line, target in _imported(path):
                if target[0] != "vitviz":
                    continue
                owner = _owner(target)
                if owner is None or owner == ["vitviz"] or importer[: len(owner)] == owner:
                    continue
                found.append(f"{path.relative_to(ROOT)}:{line} imports {'.'.join(target)} "
                             f"(private to {'.'.join(owner)})")
    return found


def test_no_cross_package_private_imports():
    found = cross_package_private_imports()
    assert not found, "use the package's public re-export instead:\n" + "\n".join(found)


def test_the_check_sees_relative_and_absolute_private_imports(tmp_path, monkeypatch):
    # the checker itself: a relative and an absolute private import from outside the owner are found,
    # the owner's own relative import and a root-private module are not
    pkg = tmp_path / "vitviz"
    (pkg / "models").mkdir(parents=True)
    (pkg / "cli" / "commands").mkdir(parents=True)
    (pkg / "_util").mkdir()
    (pkg / "_util" / "__init__.py").write_text("")
    (pkg / "_util" / "files.py").write_text("def atomic(): ...\n")
    (pkg / "models" / "__init__.py").write_text("from ._loader import load_model\n")
    (pkg / "models" / "_loader.py").write_text("from .._util.files import atomic\n")
    (pkg / "render").mkdir()
    (pkg / "render" / "__init__.py").write_text("")
    (pkg / "render" / "figures.py").write_text("_DPI = 100\n")
    (pkg / "render" / "strip.py").write_text("from .figures import _DPI\n")
    (pkg / "types.py").write_text("_as_tensor = 1\n")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "commands" / "__init__.py").write_text("")
    (pkg / "cli" / "commands" / "_common.py").write_text("")
    (pkg / "cli" / "commands" / "cls.py").write_text(
        "from ...models._loader import load_model\nimport vitviz.models._loader\nfrom ...types import _as_tensor\n"
        "from ...models import load_model\nfrom ...render.figures import _DPI\nfrom ._common import x\n"
        "from ..._util.files import atomic\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = cross_package_private_imports()
    assert found == [
        "vitviz/cli/commands/cls.py:1 imports vitviz.models._loader.load_model (private to vitviz.models)",
        "vitviz/cli/commands/cls.py:2 imports vitviz.models._loader (private to vitviz.models)",
        "vitviz/cli/commands/cls.py:3 imports vitviz.types._as_tensor (private to vitviz.types)",
        "vitviz/cli/commands/cls.py:5 imports vitviz.render.figures._DPI (private to vitviz.render)",
    ]
