"""The zoo's training script runs end to end (smoke test: a few scenes and steps, not the
shipped numbers): tokenizer, shapes-vit, shapes-captioner from that encoder, evaluation."""

import json

import pytest
import torch

import vitviz
from tools.train.train import main
from vitviz.models.bundled import shapes as zm
from vitviz.zoo.scenes import SHAPES


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_script_writes_loadable_weights(tmp_path, one_thread, capsys):
    out = str(tmp_path)
    small = ["--out", out, "--threads", "1", "--workers", "1", "--train-size", "16", "--steps", "2",
             "--batch-size", "8", "--warmup", "1", "--log-every", "1", "--heldout", "8"]
    assert main(["tokenizer", "--out", out]) == 0
    assert main(["vit", *small]) == 0
    assert main(["captioner", *small]) == 0  # --encoder-from auto: the shapes-vit just written
    assert main(["eval", *small]) == 0
    printed = capsys.readouterr().out
    assert "shapes-vit accuracy" in printed and "shapes-captioner" in printed
    info = json.loads((tmp_path / "shapes-vit.json").read_text())
    assert info["steps"] == 2 and info["train_size"] == 16
    assert info["heldout_seeds"][1] - info["heldout_seeds"][0] == 8
    # the written weights load into the shipped architectures and run
    vit = zm.shapes_vit_module()
    vit.load_state_dict(vitviz.models.read_state_dict(tmp_path / "shapes-vit.safetensors"))
    with torch.no_grad():
        assert vit(torch.zeros(1, 3, 64, 64)).shape == (1, len(SHAPES))
    assert (tmp_path / "shapes-captioner.safetensors").is_file()
