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


# what the source tree holds beside the package; copied too, so that the wheel leaves them out by its
# configuration, not because the build never saw them
BESIDE = ("tools", "tests", "benchmarks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("vitviz",) + BESIDE:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
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
    assert set(metadata.get_all("Provides-Extra")) == {"flow", "clip", "all", "dev", "docs"}
    for extra, names in EXTRA_REQUIREMENTS.items():
        assert by_extra[extra] == names, extra
    assert by_extra["all"] == set().union(*EXTRA_REQUIREMENTS.values())  # every optional part
    assert {"pytest", "selenium", "scipy", "networkx", "pytorch-pretrained-vit"} <= by_extra["dev"]
    # what the code's missing-extra messages name is what the wheel's extras install
    assert {e.name: {_norm(e.distribution)} for e in EXTRAS.values()} == EXTRA_REQUIREMENTS


def test_wheel_has_the_bundled_weights_assets_and_command(wheel):
    weights = ROOT / "vitviz/models/bundled/weights"
    expected = sorted(p for d in (weights, ROOT / "vitviz/assets") for p in d.iterdir() if p.is_file())
    # 3 models x (weights, config), the tokenizers of the two with a text side, 2 sample images
    models = ("shapes-vit", "shapes-captioner", "shapes-clip")
    assert {p.name for p in weights.glob("*.safetensors")} == {f"{m}.safetensors" for m in models}
    assert {p.name for p in weights.glob("*.json")} == ({f"{m}.json" for m in models}
                                                        | {"shapes-captioner.tokenizer.json",
                                                           "shapes-clip.tokenizer.json"})
    assert len(expected) >= 10
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in expected:
            rel = path.relative_to(ROOT).as_posix()
            assert rel in names, rel
            assert z.read(rel) == path.read_bytes(), rel  # the same bytes, not a pointer or stub
        (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert re.search(r"^vitviz\s*=\s*vitviz\.cli:main$", z.read(eps).decode(), re.M)
        assert "vitviz/_util/extras.py" in names and "vitviz/analyze/flow.py" in names
        assert "vitviz/cli/commands/rollout.py" in names
        assert z.read("vitviz/explorer/view.html") == (ROOT / "vitviz/explorer/view.html").read_bytes()


def test_wheel_leaves_out_training_tests_and_the_rest_of_the_repository(wheel):
    assert (ROOT / "tools/train/train.py").is_file() and (ROOT / "tools/train/train_clip.py").is_file()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    package = [n for n in names if ".dist-info/" not in n]
    assert package and all(n.startswith("vitviz/") for n in package), sorted(set(package))[:10]
    training = [n for n in names if n.rsplit("/", 1)[-1] in ("train.py", "train_clip.py")]
    assert training == [], "the training scripts stay in tools/train, out of the wheel"
    assert not any(n.startswith(tuple(f"{d}/" for d in BESIDE + ("gallery", "docs"))) for n in names)


def test_version_is_single_sourced_and_the_wheel_is_typed(wheel, metadata):
    import vitviz

    assert metadata["Version"] == vitviz.__version__  # pyproject reads it from vitviz/_version.py
    assert not re.search(r"^version\s*=\s*\"", (ROOT / "pyproject.toml").read_text(), re.M)  # no second copy
    assert re.search(r"^__version__\s*=", (ROOT / "vitviz/_version.py").read_text(), re.M)
    assert not re.search(r"^__version__\s*=", (ROOT / "vitviz/__init__.py").read_text(), re.M)
    with zipfile.ZipFile(wheel) as z:
        assert "vitviz/py.typed" in z.namelist()  # PEP 561: type checkers read vitviz's annotations
