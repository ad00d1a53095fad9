"""Optional parts (extras): a feature whose extra is missing says which one to install.

OR-tools is installed here (`make test` installs '.[all,dev]'), so every test makes its import
fail the way a missing package does: ``sys.modules[name] = None`` makes ``import name`` raise
ImportError. The attention flow, its command, the gallery's flow method and
``vitviz benchmark-maps`` are each run that way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitviz
from vitviz._util.extras import EXTRAS, has_extra, require_extra
from vitviz.cli import main
from vitviz.errors import MissingExtraError, VitvizError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "vitviz" / "assets").glob("*.png"))
INSTALL_FLOW = "pip install 'vitviz[flow]'"


@pytest.fixture
def no_ortools(monkeypatch):
    """OR-tools made unimportable for one test, as if `pip install vitviz` had not pulled it."""
    for name in ("ortools", "ortools.graph", "ortools.graph.python", "ortools.graph.python.max_flow"):
        monkeypatch.setitem(sys.modules, name, None)


def _tiny_attention() -> vitviz.AttentionMaps:
    att = torch.softmax(torch.randn(2, 1, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    return vitviz.AttentionMaps(att, vitviz.TokenLayout(num_prefix=1, grid=(2, 2)))


def test_flow_extra_is_installed_here_and_computes():
    assert has_extra("flow")  # the test environment has every extra
    assert vitviz.attention_flow(_tiny_attention()).shape == (1, 2, 2)


def test_attention_flow_without_ortools_names_the_extra(no_ortools):
    assert not has_extra("flow")
    with pytest.raises(MissingExtraError) as info:
        vitviz.attention_flow(_tiny_attention())
    err = info.value
    msg = str(err)
    assert INSTALL_FLOW in msg and "'ortools'" in msg and "attention flow" in msg
    assert "\n" not in msg  # one line
    assert isinstance(err, ImportError) and isinstance(err, VitvizError) and err.exit_code == 2
    assert err.extra == "flow" and err.package == "ortools" and err.name == "ortools"
    assert isinstance(err.__cause__, ImportError)  # the original import error is kept


def test_the_check_comes_first_even_when_certificates_would_do(no_ortools):
    """Spread-out attention is settled by certificates without the solver; the call must fail
    the same way anyway, so that one input does not work and the next one fail."""
    from vitviz.analyze.flow import layered_max_flow

    caps = torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64)
    with pytest.raises(MissingExtraError, match=r"vitviz\[flow\]"):
        layered_max_flow(caps, torch.ones(1, 3, dtype=torch.float64))


def test_flow_command_without_ortools_one_line_exit_2(no_ortools, tmp_path, capsys, monkeypatch):
    import vitviz.cli.commands._common as common
    from vitviz.cli.commands import command_modules

    command_modules()  # imported first, with the real `load`: a command imported under the patch would keep it

    def must_not_load(args):
        raise AssertionError("the model was loaded before the missing extra was reported")

    monkeypatch.setattr(common, "load", must_not_load)
    monkeypatch.setattr("vitviz.cli.commands.flow.load", must_not_load)
    code = main(["flow", str(SAMPLES[0]), "--model", "ti16", "--random", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vitviz: error: ") and INSTALL_FLOW in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_flow_command_in_a_fresh_process_without_ortools(tmp_path):
    """The user's view: the `vitviz` process itself, exit status and stderr as the shell sees them."""
    code = ("import sys\n"
            "for n in ('ortools', 'ortools.graph', 'ortools.graph.python', 'ortools.graph.python.max_flow'):\n"
            "    sys.modules[n] = None\n"
            "from vitviz.cli import main\n"
            f"sys.exit(main(['flow', {str(SAMPLES[0])!r}, '--model', 'ti16', '--random', "
            f"'--out', {str(tmp_path)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert INSTALL_FLOW in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_gallery_flow_method_without_ortools_fails_before_any_image(no_ortools, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(src / "a.png")
    torch.manual_seed(0)
    m = vitviz.load_model("ti16", pretrained=False, image_size=64)
    with pytest.raises(MissingExtraError, match=r"gallery method 'flow'.*vitviz\[flow\]"):
        vitviz.build_gallery(src, m, tmp_path / "out", methods="rollout,flow")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*.png")) == []
    code = main(["gallery", str(src), "--model", "ti16", "--random", "--image-size", "64",
                 "--methods", "rollout,flow", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and INSTALL_FLOW in err and err.count("\n") == 1
    assert not (tmp_path / "cli").exists()
    # the other methods need nothing optional
    assert all(vitviz.gallery.get_method(n).extra is None for n in vitviz.gallery.list_methods() if n != "flow")


def test_benchmark_maps_skips_flow_and_says_why(no_ortools, capsys):
    code = main(["benchmark-maps", "--model", "shapes-vit", "--num-images", "2", "--batch-size", "2",
                 "--steps", "1", "--no-deletion", "--no-relevance"])
    captured = capsys.readouterr()
    assert code == 0
    assert "note: attention flow was skipped" in captured.out and "attention flow  " not in captured.out
    assert INSTALL_FLOW in captured.err


def test_require_extra_returns_the_module_and_refuses_unknown_names():
    from ortools.graph.python import max_flow

    assert require_extra("flow") is max_flow
    with pytest.raises(VitvizError, match="no extra 'flw'.*clip, flow"):
        require_extra("flw")
    assert set(EXTRAS) == {"flow", "clip"}


def test_missing_clip_extra_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingExtraError) as info:
        require_extra("clip", "CLIP text maps")
    assert str(info.value).startswith("CLIP text maps needs the optional package 'open_clip_torch'")
    assert str(info.value).endswith("pip install 'vitviz[clip]'")


def test_register_method_refuses_an_unknown_extra():
    from vitviz.gallery import register_method

    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        register_method("needs_nope", extra="nope")(lambda inp: None)
    assert "needs_nope" not in vitviz.gallery.list_methods()


HEAVY = "('torch', 'timm', 'transformers', 'ortools', 'open_clip', 'pandas')"


def test_import_and_help_do_not_import_the_optional_solver():
    """The light path stays light: `import vitviz` and `vitviz --help` import no heavy library
    (the README's import and --help times rely on it), and importing the attention-flow module
    imports torch but neither OR-tools nor open_clip (nor pandas, which OR-tools pulls)."""
    code = ("import sys, vitviz\n"
            "from vitviz.cli import build_parser\n"
            "build_parser()[0].format_help()\n"
            f"print(sorted(m for m in {HEAVY} if m in sys.modules))\n"
            "import vitviz.analyze.flow\n"
            f"print(sorted(m for m in {HEAVY} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "['torch']"]


# ---- the sanity checks: extras checked before any work --------------------------------------------

def test_sanity_command_names_flow_without_ortools_exit_2_before_the_model(no_ortools, tmp_path, capsys,
                                                                          monkeypatch):
    def must_not_load(args):
        raise AssertionError("the model was loaded before the missing extra was reported")

    monkeypatch.setattr("vitviz.cli.commands.sanity.load", must_not_load)
    code = main(["sanity", str(SAMPLES[0]), "--model", "shapes-vit", "--methods", "rollout,flow",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vitviz: error: ") and INSTALL_FLOW in err and "'flow'" in err
    assert not (tmp_path / "o").exists()


def test_sanity_command_default_flow_skipped_with_a_note(no_ortools, tmp_path, capsys):
    code = main(["sanity", str(SAMPLES[0]), "--model", "shapes-vit", "--steps", "2", "--road-images", "0",
                 "--no-randomization", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    notes = [line for line in err.splitlines() if "flow" in line]
    assert len(notes) == 1 and notes[0].startswith("vitviz: note: flow is skipped: ") and INSTALL_FLOW in notes[0]
    rows = [line.split()[0] for line in out.splitlines()[3:]]  # the table's rows (after the title and header)
    assert rows == ["rollout", "cls", "relevance", "grad_rollout", "random", "centre"]


def test_sanity_check_python_defaults_and_named_flow(no_ortools):
    from vitviz.evaluate.sanity import sanity_check

    m = vitviz.load_model("shapes-vit")
    x = m.preprocess(str(SAMPLES[0]))
    with pytest.raises(MissingExtraError, match=r"vitviz\[flow\]"):
        sanity_check(m, x, ["centre", "flow"])
    rep = sanity_check(m, x, randomize=False, tokens=False, road_images=0)
    assert "flow" not in rep.randomization and INSTALL_FLOW in rep.dropped["flow"]
    assert [n for n in rep.notes if n.startswith("flow is skipped: ")] == [f"flow is skipped: {rep.dropped['flow']}"]


def test_benchmark_maps_sanity_skips_flow_once_and_does_not_run_it(no_ortools, capsys):
    code = main(["benchmark-maps", "--model", "shapes-vit", "--sanity", "--num-images", "2", "--steps", "2",
                 "--road-images", "0", "--batch-size", "2", "--markdown"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| flow |" not in out and "| rollout |" in out and "| centre |" in out
    said = [line for line in (out + err).splitlines() if "flow" in line and "skipped" in line]
    assert len(said) == 1 and said[0].startswith("note: flow is skipped: ") and INSTALL_FLOW in said[0]
    assert "vitviz: error" not in err
