"""The old module paths keep working after the move to packages (0.2), and the moved ones say so.

Each import runs in a fresh interpreter, so that the alias module runs (and warns) as it would
in a user's program, whatever this test session imported before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# old path -> (where it lives now, a name old code reaches through it)
MOVED = {
    "vitviz.hooks": ("vitviz.attention", "capture"),
    "vitviz.textmaps": ("vitviz.explain.text", "explain_text"),
    "vitviz.sanity": ("vitviz.evaluate.sanity", "randomization"),
    "vitviz.perturbation": ("vitviz.evaluate.perturbation", "token_curves"),
    "vitviz.faithfulness": ("vitviz.evaluate.faithfulness", "deletion_insertion"),
    "vitviz.captioning": ("vitviz.explain.captioning", "caption"),
    "vitviz.engine": ("vitviz.batch", "iter_captures"),
    "vitviz.map_writer": ("vitviz.batch", "rollout_files"),
}
# the same path as before, now a package (or the public name of one): no warning
KEPT = {
    "vitviz.metrics": ("vitviz.evaluate", "pointing_game"),
    "vitviz.cli": ("vitviz.cli", "main"),
    "vitviz.explain": ("vitviz.explain", "relevance"),
}

_PROBE = """
import importlib, json, sys, warnings
old, new, name = sys.argv[1:]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = importlib.import_module(old)
    value = getattr(module, name)
print(json.dumps({
    "deprecations": [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                     and "vitviz" in str(w.message)],
    "same_module": module is importlib.import_module(new) and sys.modules[old] is module,
    "callable": callable(value),
    "defined_in": getattr(value, "__module__", None),
}))
"""


def _probe(old: str, new: str, name: str) -> dict:
    run = subprocess.run([sys.executable, "-c", _PROBE, old, new, name], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_reaches_the_new_module(old):
    new, name = MOVED[old]
    got = _probe(old, new, name)
    assert got["deprecations"] == [f"{old} moved to {new}; import it from there (this alias goes in the next release)"]
    assert got["same_module"] and got["callable"]
    assert got["defined_in"].startswith(new)  # the moved function itself, not a wrapper


@pytest.mark.parametrize("path", sorted(KEPT))
def test_a_kept_path_imports_without_a_warning(path):
    new, name = KEPT[path]
    got = _probe(path, new, name)
    assert got["deprecations"] == []
    assert got["same_module"] and got["callable"]
