"""`vitviz sanity` and `vitviz benchmark-maps --sanity`: outputs, exit statuses, one-line errors;
the report's table against the metrics computed directly."""

from pathlib import Path

import numpy as np
import torch

import vitviz
from vitviz.cli import main
from vitviz.evaluate.sanity import sanity_check

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))


def test_sanity_command_writes_table_and_figures(tmp_path, capsys):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    code = main(["sanity", str(SAMPLES[0]), str(bad), "--model", "shapes-vit", "--methods", "rollout,random",
                 "--steps", "4", "--road-steps", "2", "--road-images", "1", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 1  # one unreadable image skipped
    assert "empty.png" in err
    assert "rollout" in out and "random" in out and "token deletion AUC" in out
    for name in ("sanity_table.md", "sanity_randomization.png", "sanity_curves.png"):
        assert (tmp_path / "o" / name).stat().st_size > 0
    assert not list((tmp_path / "o").glob("*.tmp*"))


def test_sanity_command_bad_arguments_exit_2(tmp_path, capsys):
    code = main(["sanity", str(SAMPLES[0]), "--model", "shapes-vit", "--methods", "rollout,rolout",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "rolout" in err and len(err.strip().splitlines()) == 1
    assert main(["sanity", str(SAMPLES[0]), "--model", "shapes-vit", "--road-images", "-1"]) == 2


def test_report_rows_equal_the_metrics_computed_directly():
    m = vitviz.load_model("shapes-vit")
    x = torch.cat([m.preprocess(str(p)) for p in SAMPLES])
    rep = sanity_check(m, x, ["rollout", "centre"], steps=4, road_steps=2, road_images=1)
    rows = rep.rows()
    r = vitviz.evaluate.randomization(m, x, "rollout")
    assert rows["rollout"]["rand_all"] == float(r.spearman[-1].mean())
    assert rows["rollout"]["rand_head"] == 1.0  # rollout does not read the head
    c = vitviz.evaluate.token_curves(m, x, r.maps[0], steps=4)
    assert np.isclose(rows["rollout"]["tok_del"], float(c.deletion_auc.mean()))
    assert np.isclose(rows["rollout"]["tok_ins"], float(c.insertion_auc.mean()))
    rc = vitviz.evaluate.road(m, x[:1], r.maps[0][:1], steps=2)
    assert np.isclose(rows["rollout"]["road_morf"], float(rc.morf_auc.mean()), atol=1e-4)
    assert rows["centre"]["rand_all"] == 1.0  # a baseline that ignores the model passes nothing
    assert len(rep.road["rollout"].morf) == 1


def test_benchmark_maps_sanity(capsys):
    code = main(["benchmark-maps", "--model", "shapes-vit", "--sanity", "--num-images", "2", "--steps", "2",
                 "--road-images", "0", "--batch-size", "2", "--markdown"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| relevance |" in out and "| baseline" not in out and "| centre |" in out
