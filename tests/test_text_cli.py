"""`vitviz text` on the bundled shapes-clip architecture (untrained, --random: no weights needed)."""

from pathlib import Path

import numpy as np
import torch
from helpers import tiny_word_clip
from PIL import Image

import vitviz
from vitviz.cli import main

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
TEXTS = ["a red triangle", "a blue circle"]


def test_text_strip_png_and_npy(tmp_path, capsys):
    code = main(["text", str(SAMPLES[0]), str(SAMPLES[1]), "--model", "shapes-clip", "--random",
                 "--text", TEXTS[0], "--text", TEXTS[1], "--method", "legrad", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "best match" in out
    for src in SAMPLES[:2]:
        png = tmp_path / f"{src.stem}_text.png"
        with Image.open(png) as im:  # a real PNG: the image plus one panel per text, side by side
            im.load()
            assert im.format == "PNG" and im.width > 2 * im.height
            rgb = np.asarray(im.convert("RGB"))
        assert rgb.std() > 10  # not blank
        maps = np.load(tmp_path / f"{src.stem}_text.npy")
        assert maps.shape == (2, 8, 8) and np.isfinite(maps).all()


def test_text_npy_equals_the_library(tmp_path):
    torch.manual_seed(0)
    assert main(["text", str(SAMPLES[0]), "--model", "shapes-clip", "--random", "--text", TEXTS[0],
                 "--text", TEXTS[1], "--out", str(tmp_path)]) == 0
    maps = np.load(tmp_path / f"{SAMPLES[0].stem}_text.npy")
    torch.manual_seed(0)  # the same untrained weights
    m = vitviz.load_model("shapes-clip", pretrained=False)
    np.testing.assert_allclose(maps, vitviz.explain_text(m, str(SAMPLES[0]), TEXTS).numpy(), rtol=1e-5, atol=1e-6)


def test_text_needs_a_text_tower(tmp_path, capsys):
    code = main(["text", str(SAMPLES[0]), "--model", "shapes-vit", "--random", "--text", "a red circle",
                 "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no text tower" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_text_empty_text_and_bad_image(tmp_path, capsys):
    assert main(["text", str(SAMPLES[0]), "--model", "shapes-clip", "--random", "--text", " ",
                 "--out", str(tmp_path)]) == 2
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code = main(["text", str(bad), str(SAMPLES[0]), "--model", "shapes-clip", "--random", "--text", "a red star",
                 "--out", str(tmp_path / "o")])
    assert code == 1
    assert "broken.png" in capsys.readouterr().err
    assert (tmp_path / "o" / f"{SAMPLES[0].stem}_text.png").is_file()


def test_text_on_a_transformers_clip_directory_with_its_tokenizer(tmp_path):
    """load_model(dir) of a CLIPModel attaches the directory's tokenizer: strings work."""

    from vitviz.models.bundled.shapes_clip import build_tokenizer_file, load_tokenizer

    build_tokenizer_file(tmp_path / "tok.json")
    tok = load_tokenizer(tmp_path / "tok.json")
    d = tmp_path / "clip"
    tiny_word_clip(tok, text_layers=1, context=12).save_pretrained(d)
    tok.save_pretrained(d)
    m = vitviz.load_model(str(d))
    assert m.tokenizer is not None
    out = tmp_path / "o"
    assert main(["text", str(SAMPLES[0]), "--model", str(d), "--text", TEXTS[0], "--text", TEXTS[1],
                 "--method", "maskclip", "--out", str(out)]) == 0
    maps = np.load(out / f"{SAMPLES[0].stem}_text.npy")
    assert maps.shape == (2, 4, 4)
    np.testing.assert_allclose(maps, vitviz.explain_text(m, str(SAMPLES[0]), TEXTS, method="maskclip").numpy(),
                               rtol=1e-5, atol=1e-6)


def test_text_warns_once_naming_the_words_outside_the_vocabulary(tmp_path, capsys):
    code = main(["text", str(SAMPLES[0]), str(SAMPLES[1]), "--model", "shapes-clip", "--random",
                 "--text", "a dog on a skateboard", "--text", "a red circle", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("vitviz: warning: ")]
    assert len(warned) == 1, err  # one line for the run, not one per image
    assert '"dog", "on", "skateboard"' in warned[0] and "shapes-clip" in warned[0]
    assert "circle\"" not in warned[0]  # a known word is not named
    assert "Traceback" not in err
    assert main(["text", str(SAMPLES[0]), "--model", "shapes-clip", "--random", "--text", "a red circle",
                 "--out", str(tmp_path / "known")]) == 0
    assert "warning" not in capsys.readouterr().err
