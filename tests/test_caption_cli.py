"""`vitviz caption` offline on random captioners saved to disk, and the captioner aliases."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import VOCAB, build_blip, build_ved, save_tiny_blip
from PIL import Image

import vitviz
from vitviz.cli import main
from vitviz.errors import WeightsNotFoundError
from vitviz.models._loader import resolve

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
@pytest.fixture(scope="module")
def ved_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ved")
    build_ved().save_pretrained(d)  # config + random weights, no tokenizer files
    return d


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def test_caption_command_writes_strips_and_notes_token_ids_once(ved_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["caption", str(SAMPLES[0]), str(SAMPLES[1]), "--model", str(ved_dir),
                 "--max-new-tokens", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s.stem}_caption.png" for s in SAMPLES[:2])
    png = np.asarray(Image.open(out / f"{SAMPLES[0].stem}_caption.png"))
    assert png.ndim == 3 and png.shape[1] > png.shape[0]  # a strip: wider than tall
    assert captured.err.count("token ids") == 1  # said once, not per image
    # the printed caption is the library's caption of the same image
    m = vitviz.load_model(str(ved_dir))
    cap = vitviz_caption(m, SAMPLES[0])
    assert f"{SAMPLES[0]} -> {out / (SAMPLES[0].stem + '_caption.png')}  [{cap.text}]" in captured.out


def vitviz_caption(m, path):
    from vitviz.explain.captioning import caption

    return caption(m, path, max_new_tokens=4)


def test_caption_command_with_tokenizer_beams_and_options(blip_dir, tmp_path, capsys):
    code = main(["caption", str(SAMPLES[0]), "--model", str(blip_dir), "--max-new-tokens", "5",
                 "--num-beams", "2", "--layer", "mean", "--head-fusion", "max", "--rollout",
                 "--merge", "sum", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "token ids" not in captured.err
    m = vitviz.load_model(str(blip_dir))
    assert m.tokenizer is not None  # attached from the directory's tokenizer files
    from vitviz.explain.captioning import caption

    cap = caption(m, SAMPLES[0], max_new_tokens=5, num_beams=2)
    assert cap.note is None and f"[{cap.text}]" in captured.out
    assert cap.text == "pizza pizza pizza holding on" and len(cap.words) == 5
    assert (tmp_path / f"{SAMPLES[0].stem}_caption.png").is_file()


def test_caption_command_random_weights_and_bad_inputs(ved_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    code = main(["caption", str(SAMPLES[0]), str(empty), "--model", str(ved_dir), "--random",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"skipped {empty}" in err and "1 done, 1 skipped" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == [f"{SAMPLES[0].stem}_caption.png"]


def test_caption_command_relevance(ved_dir, tmp_path, capsys):
    code = main(["caption", str(SAMPLES[0]), "--model", str(ved_dir), "--max-new-tokens", "3",
                 "--relevance", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / f"{SAMPLES[0].stem}_caption.png").is_file()
    assert main(["caption", str(SAMPLES[0]), "--model", str(ved_dir), "--relevance", "--rollout"]) == 2


def test_caption_command_errors_are_one_line_exit_2(ved_dir, tmp_path, capsys):
    assert main(["caption", str(SAMPLES[0]), "--model", str(ved_dir), "--layer", "x"]) == 2
    assert main(["caption", str(SAMPLES[0]), "--model", str(ved_dir), "--num-beams", "0"]) == 2
    capsys.readouterr()
    code = main(["caption", str(SAMPLES[0]), "--model", "ti16", "--random", "--image-size", "32",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a captioner" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# aliases and the local cache
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_captioner_aliases_resolve_to_transformers_ids():
    assert resolve("vit-gpt2").source == "transformers"
    assert resolve("vit-gpt2").model_id == "nlpconnect/vit-gpt2-image-captioning"
    assert resolve("blip-base").model_id == "Salesforce/blip-image-captioning-base"
    assert {"vit-gpt2", "blip-base"} <= set(vitviz.list_models())


def test_captioner_alias_not_cached_is_a_clear_fast_error(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as e:
        vitviz.load_model("blip-base")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "Salesforce/blip-image-captioning-base" in msg and str(hf_cache) in msg and "--random" in msg


def test_captioner_alias_loads_from_the_local_cache_with_its_tokenizer(hf_cache):
    folder = hf_cache / "models--Salesforce--blip-image-captioning-base"
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    save_tiny_blip(snap)
    ref = build_blip(seed=0, vocab=len(VOCAB))
    m = vitviz.load_model("blip-base")
    assert type(m.tokenizer).__name__ == "BertTokenizer"
    for a, b in zip(m.module.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    from vitviz.explain.captioning import caption

    cap = caption(m, torch.randn(1, 3, 32, 32), max_new_tokens=3)
    assert cap.note is None and cap.tokens == m.tokenizer.convert_ids_to_tokens(cap.token_ids)


# ---------------------------------------------------------------------------------------------
# error hints fit the interface they are shown in
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_random_without_the_config_does_not_suggest_random(hf_cache, monkeypatch, offline, tmp_path, capsys):
    """--random builds the architecture from config.json: offline, that is what is missing, and
    the message says so instead of suggesting --random (given) or --weights (needs it too)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    t0 = time.monotonic()
    code = main(["caption", str(SAMPLES[0]), "--model", "vit-gpt2", "--random", "--out", str(tmp_path / "o")])
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "nlpconnect/vit-gpt2-image-captioning" in err and "config.json" in err and str(hf_cache) in err
    assert "vitviz fetch vit-gpt2" in err and "local model directory" in err
    assert "use --random" not in err and "pass --weights FILE" not in err
    # without --random the weights are missing too, and --random is a way out
    code = main(["caption", str(SAMPLES[0]), "--model", "vit-gpt2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "use --random" in err and "--weights FILE" in err


def test_not_a_captioner_gives_command_line_hints(tmp_path, capsys):
    """The command line cannot pass decode= / start_ids=: it names the captioners it takes; the
    Python API keeps its own hint (those arguments)."""
    code = main(["caption", str(SAMPLES[0]), "--model", "shapes-vit", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a captioner" in err
    assert "start_ids" not in err and "decode=fn" not in err and "forward=" not in err
    assert "--model vit-gpt2" in err and "shapes-captioner" in err
    assert not (tmp_path / "o").exists()
    from vitviz.explain.captioning import caption

    with pytest.raises(vitviz.VitvizError, match=r"start_ids=\[bos_id\]"):
        caption(vitviz.load_model("shapes-vit"), SAMPLES[0])
