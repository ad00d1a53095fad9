"""The wheel users install: its metadata (core requirements, extras) and its data files.

The wheel is built offline from a copy of the sources (so no build/ or egg-info lands in the
work tree) with the installed setuptools: ``pip wheel --no-deps --no-build-isolation``.
"""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vitviz._util.extras import EXTRAS

ROOT = Path(__file__).resolve().parent.parent

# The design (issue 18): the core is what the main job needs; one feature's heavy parts are extras.
CORE = {"torch", "timm", "transformers", "huggingface-hub", "opencv-python-headless", "matplotlib",
        "numpy", "pillow", "safetensors", "tqdm"}
EXTRA_REQUIREMENTS = {"flow": {"ortools"}, "clip": {"open-clip-torch"}}
NEVER_IN_CORE = {"ortools", "pandas", "protobuf", "absl-py", "open-clip-torch", "selenium", "pytest",
                 "scipy", "networkx", "pytorch-pretrained-vit"}


def _norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(requirement: str) -> tuple[str, str | None]:
    """``Requires-Dist`` value -> (normalised name, extra it belongs to or None)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
    return _norm(name), (extra.group(1) if extra else None)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "vitviz", src / "vitviz", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "--quiet", "--wheel-dir", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    wheels = list(out.glob("vitviz-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_core_requirements_are_the_light_set(metadata):
    reqs = [_parse(r) for r in metadata.get_all("Requires-Dist")]
    core = {name for name, extra in reqs if extra is None}
    assert core == CORE
    assert not core & NEVER_IN_CORE
    assert metadata["Name"] == "vitviz" and metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"


def test_extras_as_designed(metadata):
    reqs = [_parse(r) for r in metadata.get_all("Requires-Dist")]
    by_extra: dict[str, set] = {}
    for name, extra in reqs:
        if extra is not None:
            by_extra.setdefault(extra, set()).add(name)
    assert set(metadata.get_all("Provides-Extra")) == {"flow", "clip", "all", "dev"}
    for extra, names in EXTRA_REQUIREMENTS.items():
        assert by_extra[extra] == names, extra
    assert by_extra["all"] == set().union(*EXTRA_REQUIREMENTS.values())  # every optional part
    assert {"pytest", "selenium", "scipy", "networkx", "pytorch-pretrained-vit"} <= by_extra["dev"]
    # what the code's missing-extra messages name is what the wheel's extras install
    assert {e.name: {_norm(e.distribution)} for e in EXTRAS.values()} == EXTRA_REQUIREMENTS


def test_wheel_has_the_zoo_weights_assets_and_command(wheel):
    expected = sorted(p for d in ("vitviz/zoo/weights", "vitviz/assets") for p in (ROOT / d).iterdir()
                      if p.is_file())
    assert len(expected) >= 7  # 2 models x (weights, config) + tokenizer + sample images
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in expected:
            rel = path.relative_to(ROOT).as_posix()
            assert rel in names, rel
            assert z.read(rel) == path.read_bytes(), rel  # the same bytes, not a pointer or stub
        (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert re.search(r"^vitviz\s*=\s*vitviz\.cli:main$", z.read(eps).decode(), re.M)
        assert "vitviz/_extras.py" in names and "vitviz/analyze/flow.py" in names
        assert z.read("vitviz/render/explore.html") == (ROOT / "vitviz/render/explore.html").read_bytes()
        assert not any(n.startswith(("tests/", "benchmarks/", "gallery/")) for n in names)


def test_version_is_single_sourced_and_the_wheel_is_typed(wheel, metadata):
    import vitviz

    assert metadata["Version"] == vitviz.__version__  # pyproject reads it from vitviz/__init__.py
    assert not re.search(r"^version\s*=\s*\"", (ROOT / "pyproject.toml").read_text(), re.M)  # no second copy
    with zipfile.ZipFile(wheel) as z:
        assert "vitviz/py.typed" in z.namelist()  # PEP 561: type checkers read vitviz's annotations
