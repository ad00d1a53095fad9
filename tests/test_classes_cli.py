"""Class names (issue 30): --class takes a name as well as an index, `vitviz classes` lists them,
an unknown name is one line with the close ones."""

from pathlib import Path

import numpy as np
import pytest

import vitviz
from vitviz.cli import main
from vitviz.errors import VitvizError
from vitviz.models import class_index, class_label

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
VIT = ["--model", "shapes-vit"]


class Labelled:
    name = "toy"
    labels = ["tabby, tabby cat", "tiger cat", "Egyptian cat", "notebook, notebook computer", "laptop, laptop computer"]


def test_class_index_golden():
    m = Labelled()
    assert class_index(m, 3) == 3 and class_index(m, "3") == 3
    assert class_index(m, "tiger cat") == 1
    assert class_index(m, "Tabby") == 0  # a synonym, any case
    assert class_index(m, "egyptian_cat") == 2  # _ for space
    assert class_index(m, "  laptop computer ") == 4
    assert class_label(m, 1) == "tiger cat (class 1)" and class_label(m, 1, 0.254) == "tiger cat (class 1, p=0.25)"
    assert class_label(m, 9, 0.5) == "class 9 (p=0.50)" and class_label(m, 9) == "class 9"


def test_unknown_and_ambiguous_names():
    m = Labelled()
    with pytest.raises(VitvizError, match=r"'tigre cat' is not a class name of toy; close: tiger cat \(1\)"):
        class_index(m, "tigre cat")
    m.labels = ["crane", "crane"]  # ImageNet has two cranes (a bird and a machine)
    with pytest.raises(VitvizError, match="names 2 classes of toy: 0 .*1 .*give the index"):
        class_index(m, "crane")

    class Unnamed:
        name, labels = "plain", None

    with pytest.raises(VitvizError, match="plain has no class names; give a class index"):
        class_index(Unnamed(), "cat")


def test_relevance_class_by_name_equals_by_index(tmp_path, capsys):
    by_name, by_index = tmp_path / "name", tmp_path / "index"
    assert main(["relevance", str(SAMPLES[0]), *VIT, "--class", "triangle", "--out", str(by_name)]) == 0
    assert main(["relevance", str(SAMPLES[0]), *VIT, "--class", "2", "--out", str(by_index)]) == 0
    stem = SAMPLES[0].stem
    a, b = np.load(by_name / f"{stem}_relevance.npy"), np.load(by_index / f"{stem}_relevance.npy")
    np.testing.assert_array_equal(a, b)
    other = tmp_path / "other"
    assert main(["relevance", str(SAMPLES[0]), *VIT, "--class", "circle", "--out", str(other)]) == 0
    assert not np.array_equal(a, np.load(other / f"{stem}_relevance.npy"))  # the name picks the class
    assert "explained: triangle (class 2, p=" in capsys.readouterr().out


def test_unknown_class_name_is_a_user_error(tmp_path, capsys):
    code = main(["relevance", str(SAMPLES[0]), *VIT, "--class", "trinagle", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'trinagle' is not a class name of shapes-vit; close: triangle (2)" in err
    assert "vitviz classes shapes-vit" in err
    assert not (tmp_path / "o").exists()
    code = main(["relevance", str(SAMPLES[0]), *VIT, "--class", "-1", "--out", str(tmp_path / "o")])
    assert code == 2 and ">= 0" in capsys.readouterr().err


def test_classes_command(capsys):
    assert main(["classes", "shapes-vit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = vitviz.load_model("shapes-vit")
    assert lines == [f"{i}  {name}" for i, name in enumerate(model.labels)]
    assert main(["classes", "shapes-vit", "--find", "TRI"]) == 0
    assert capsys.readouterr().out.splitlines() == ["2  triangle"]
    assert main(["classes", "ti16", "--random"]) == 0  # no names: says so, with the range
    assert "no class names (1000 classes, 0..999)" in capsys.readouterr().out


def test_explore_class_by_name(tmp_path, monkeypatch, capsys):
    """`vitviz explore --class NAME` hands the explorer the index the name stands for."""
    import vitviz.explorer

    seen = []
    real = vitviz.explorer.explore

    def spy(model, image, *, target=None, **kwargs):
        seen.append(target)
        return real(model, image, target=target, **kwargs)

    monkeypatch.setattr(vitviz.explorer, "explore", spy)
    assert main(["explore", str(SAMPLES[0]), *VIT, "--class", "Square", "--out", str(tmp_path / "p.html")]) == 0
    assert seen == [1] and (tmp_path / "p.html").is_file()
    assert main(["explore", str(SAMPLES[0]), *VIT, "--class", "sqare", "--out", str(tmp_path / "q.html")]) == 2
    assert "close: square (1)" in capsys.readouterr().err
