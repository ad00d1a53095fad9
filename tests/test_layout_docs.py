"""The README's layout section and ARCHITECTURE.md name what is in the tree, and the tree holds
nothing they leave out."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layout_entries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    block = section.split("```\n", 2)[1]  # the fenced block of the section
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_every_layout_entry_exists():
    entries = _layout_entries()
    assert len(entries) >= 10
    missing = [e for e in entries if not (ROOT / e.rstrip("/")).exists()
               or e.endswith("/") != (ROOT / e.rstrip("/")).is_dir()]
    assert not missing, f"README layout names what the tree lacks: {missing}"


def test_every_public_part_of_the_package_is_in_the_layout():
    entries = set(_layout_entries())
    public = {f"vitviz/{p.name}/" if p.is_dir() else f"vitviz/{p.name}" for p in (ROOT / "vitviz").iterdir()
              if not p.name.startswith(("_", ".")) and (p.is_dir() and (p / "__init__.py").exists()
                                                        or p.suffix == ".py")}
    assert public - entries == set(), f"add these to the README's layout section: {sorted(public - entries)}"


def _aliases() -> set[Path]:
    """The root modules that alias an old path (``sys.modules[__name__] = ...``)."""
    alias = re.compile(r"^sys\.modules\[__name__\] = ", re.M)
    return {p for p in (ROOT / "vitviz").glob("*.py") if alias.search(p.read_text())}


def test_architecture_names_existing_modules():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:vitviz|tests|benchmarks|tools)/[\w/.]+)`", text))
    assert len(named) >= 10
    missing = sorted(n for n in named if not (ROOT / n.rstrip("/")).exists())
    assert not missing, f"ARCHITECTURE.md names what the tree lacks: {missing}"


def test_architecture_names_every_module():
    # each module file by its name (names are unique in the tree: tests/test_layers.py), leaving out
    # __init__.py, the subcommands (one per command, found automatically) and the aliases of old paths
    text = (ROOT / "ARCHITECTURE.md").read_text()
    commands = ROOT / "vitviz" / "cli" / "commands"
    files = [p for p in sorted((ROOT / "vitviz").rglob("*")) if p.suffix in (".py", ".html")
             and "__pycache__" not in p.parts and p.name != "__init__.py" and p not in _aliases()
             and not (p.parent == commands and not p.name.startswith("_"))]
    assert len(files) >= 60
    missing = [p.relative_to(ROOT).as_posix() for p in files if f"`{p.name}`" not in text and
               f"`{p.relative_to(ROOT).as_posix()}`" not in text]
    assert not missing, f"ARCHITECTURE.md leaves out these modules: {missing}"
