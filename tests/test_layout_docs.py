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


def test_architecture_names_existing_modules():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:vitviz|tests|benchmarks)/[\w/.]+)`", text))
    assert len(named) >= 10
    missing = sorted(n for n in named if not (ROOT / n.rstrip("/")).exists())
    assert not missing, f"ARCHITECTURE.md names what the tree lacks: {missing}"
    for module in ("_checkpoint_read.py", "_checkpoint_convert.py", "_outputs.py", "_plan.py", "_run.py",
                   "_page.py", "_decoding.py", "_words.py", "_caption.py", "evaluate.py"):
        assert module in text
