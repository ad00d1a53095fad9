"""Gallery methods beyond rollout and cls: streaming vs stored capture, gradient relevance
(one forward + one backward per batch), and captions with word maps for captioning models."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import vitviz
from vitviz.errors import VitvizError
from vitviz.gallery import _run, build_gallery, list_methods


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several jobs: see tests/test_gallery.py
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vitviz.load_model("ti16", pretrained=False, image_size=64, device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("methods-src")
    rng = np.random.default_rng(1)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    return src


def test_streamed_capture_keeps_no_layer_and_equals_the_stored_path(model, folder, tmp_path, monkeypatch):
    import vitviz.attention

    calls = []
    real = vitviz.attention.capture

    @functools.wraps(real)  # keeps the signature the gallery inspects
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(vitviz.attention, "capture", spy)
    opts = {"rollout": {"discard_ratio": 0.5, "head_fusion": "max"}, "cls": {"layer": 4}}
    streamed = build_gallery(folder, model, tmp_path / "s", options=opts, batch_size=3, workers=0,
                             progress=False)
    assert calls and all(c.get("keep") == "none" and set(c["streams"]) == {"rollout", "cls"} for c in calls)
    calls.clear()
    monkeypatch.setattr(_run, "USE_STREAMS", False)
    stored = build_gallery(folder, model, tmp_path / "k", options=opts, batch_size=3, workers=0,
                           progress=False)
    assert calls and all("keep" not in c for c in calls)
    for a, b in zip(streamed.done, stored.done):
        for m in ("rollout", "cls"):
            np.testing.assert_array_equal(np.load(tmp_path / "s" / a["outputs"][m]["npy"]),
                                          np.load(tmp_path / "k" / b["outputs"][m]["npy"]))
    # and both equal the analyzers on the stored attention of one image
    x = model.preprocess(folder / "im3.png")
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(x)
    np.testing.assert_allclose(np.load(tmp_path / "s" / "rollout" / "im3.npy"),
                               vitviz.rollout(rec.attentions, discard_ratio=0.5, head_fusion="max")[0],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(tmp_path / "s" / "cls" / "im3.npy"),
                               vitviz.cls_maps(rec.attentions, layer=4)[0], rtol=1e-5, atol=1e-7)


def test_relevance_methods_equal_vitviz_relevance_with_one_backward(model, folder, tmp_path, monkeypatch):
    assert "relevance" in list_methods()
    from vitviz.explain import relevance

    backward, active = [], []
    real = torch.autograd.grad

    def spy(*a, **k):  # counts outer calls: inside a capture, grad re-enters via the torch-function mode
        if not active:
            backward.append(1)
        active.append(1)
        try:
            return real(*a, **k)
        finally:
            active.pop()

    monkeypatch.setattr(torch.autograd, "grad", spy)
    r = build_gallery(folder, model, tmp_path / "g", methods="rollout,relevance,grad_rollout",
                      options={"grad_rollout": {"discard_ratio": 0.3}}, batch_size=4, workers=0,
                      progress=False)
    assert r.exit_code == 0 and len(r.done) == 7
    assert len(backward) == 2  # one backward pass per batch (7 images in batches of 4), shared
    assert all(p.grad is None for p in model.module.parameters())  # no parameter gradients
    for rec in r.done:
        x = model.preprocess(folder / rec["key"])
        np.testing.assert_allclose(np.load(tmp_path / "g" / rec["outputs"]["relevance"]["npy"]),
                                   relevance(model, x)[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / "g" / rec["outputs"]["grad_rollout"]["npy"]),
                                   relevance(model, x, method="grad_rollout", discard_ratio=0.3)[0],
                                   rtol=1e-4, atol=1e-6)
        # the explained class is the predicted one in the manifest
        with torch.no_grad():
            assert model(x).argmax(-1).item() == rec["prediction"]["index"]
    # computed in the backward pass (gradient streams) == from the stored attention and gradients
    monkeypatch.setattr(_run, "USE_STREAMS", False)
    stored = build_gallery(folder, model, tmp_path / "k", methods="rollout,relevance,grad_rollout",
                           options={"grad_rollout": {"discard_ratio": 0.3}}, batch_size=4, workers=0,
                           progress=False)
    for a, b in zip(r.done, stored.done):
        for m in ("rollout", "relevance", "grad_rollout"):
            np.testing.assert_allclose(np.load(tmp_path / "g" / a["outputs"][m]["npy"]),
                                       np.load(tmp_path / "k" / b["outputs"][m]["npy"]), rtol=1e-5, atol=1e-7)


def test_flow_method_equals_attention_flow(model, folder, tmp_path):
    assert "flow" in list_methods()
    from vitviz.analyze.flow import attention_flow

    r = build_gallery(folder, model, tmp_path / "g", methods="flow", batch_size=4, workers=0,
                      progress=False, limit=3, options={"flow": {"start_layer": 6}})
    assert r.exit_code == 0 and len(r.done) == 3
    for rec in r.done:
        with torch.no_grad(), vitviz.capture(model) as cap:
            model(model.preprocess(folder / rec["key"]))
        np.testing.assert_allclose(np.load(tmp_path / "g" / rec["outputs"]["flow"]["npy"]),
                                   attention_flow(cap.attentions, start_layer=6)[0], rtol=1e-4, atol=1e-6)


def _tiny_captioner():
    from helpers import build_ved  # ViT encoder + GPT-2 decoder, 2 layers each

    return vitviz.wrap(build_ved(), name="tiny-ved")


def test_caption_method_writes_the_caption_and_one_map_per_word(folder, tmp_path):
    assert "caption" in list_methods()
    from vitviz.explain.captioning import caption

    m = _tiny_captioner()
    r = build_gallery(folder, m, tmp_path / "g", methods="caption", options={"caption": {"max_new_tokens": 4}},
                      batch_size=3, workers=0, progress=False, limit=4)
    assert r.exit_code == 0 and len(r.done) == 4
    for rec in r.done:
        cap = caption(m, m.preprocess(folder / rec["key"]), max_new_tokens=4)
        assert rec["caption"] == cap.text and rec["prediction"] is None
        out = rec["outputs"]["caption"]
        assert out["names"] == [w.text for w in cap.words]
        np.testing.assert_allclose(np.load(tmp_path / "g" / out["npy"]),
                                   cap.word_grids(merge="mean"), rtol=1e-5, atol=1e-7)
    page = (tmp_path / "g" / "index.html").read_text()
    assert f'<span class="cap">{r.done[0]["caption"]}</span>' in page
    # attention methods call the model as model(images): a captioner gets a typed error
    with pytest.raises(VitvizError, match="--methods caption"):
        build_gallery(folder, m, tmp_path / "r", methods="rollout", workers=0, progress=False, limit=2)


def test_throughput_measurement_runs_and_reports_ratios(model, folder, tmp_path):
    """The benchmark's gallery-vs-plain measurement, reduced so that it cannot rot."""
    from benchmarks.gallery_throughput import measure_throughput

    r = measure_throughput(model, folder, tmp_path / "g", batch_size=4, workers=0, reps=1, limit=4)
    assert r["images"] == 4
    for k in ("gallery", "forward", "decode_forward"):
        assert r[k] > 0 and r["cpu_ms_per_image"][k] > 0
    assert r["ratio_forward"] == pytest.approx(r["gallery"] / r["forward"])
    assert len(list((tmp_path / "g" / "rollout").glob("*.jpg"))) == 4


@pytest.mark.parametrize("layer", [0, 2, -1, -3])
def test_layer_stream_equals_cls_maps_of_stored_attention(layer):
    from vitviz.explain import LayerStream
    from vitviz.types import AttentionMaps, TokenLayout

    layout = TokenLayout(num_prefix=2, grid=(2, 3))  # CLS + one more prefix token, 2x3 patches
    attn = AttentionMaps(torch.randn(4, 2, 3, 8, 8).softmax(-1), layout)  # [L, B, H, N, N]
    s = LayerStream(layer)
    for depth in (4, None, 4):  # depth known while running or not; a new pass starts afresh
        s.reset()
        for i, a in enumerate(attn.tensor):
            s.update(a, layer=i, num_layers=depth, layout=layout)  # [B, H, N, N]
        torch.testing.assert_close(s.result(layout), vitviz.cls_maps(attn, layer=layer), rtol=0, atol=0)
    short = LayerStream(5)
    for i, a in enumerate(attn.tensor):
        short.update(a, layer=i, num_layers=4, layout=layout)
    with pytest.raises(ValueError, match="out of range"):
        short.result(layout)


def test_hierarchical_model_cls_on_the_last_stage_and_rollout_refused(folder, tmp_path):
    """PiT's last layer attends over a 2x2 grid (plus CLS): the cls method maps it there; rollout
    chains layers over one token set, which PiT does not have: one error saying why."""
    from vitviz.errors import CaptureError

    torch.manual_seed(0)
    pit = vitviz.load_model("pit_ti_224", pretrained=False, image_size=64, device="cpu")
    r = build_gallery(folder, pit, tmp_path / "g", methods="cls", batch_size=2, workers=0, progress=False, limit=3)
    assert r.exit_code == 0 and len(r.done) == 3
    for rec in r.done:
        with torch.no_grad(), vitviz.capture(pit) as cap:
            pit(pit.preprocess(folder / rec["key"]))
        last = cap.stages[-1]
        assert last.layout.grid == (2, 2)
        saved = np.load(tmp_path / "g" / rec["outputs"]["cls"]["npy"])
        np.testing.assert_allclose(saved, vitviz.cls_maps(last, layer=-1)[0].numpy(), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(CaptureError, match="within a stage"):
        build_gallery(folder, pit, tmp_path / "r", methods="rollout", workers=0, progress=False, limit=2)
