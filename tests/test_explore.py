"""The explorer's data (vitviz.explore, vitviz.explorer._view): quantisation, equality with the
analyzers, the page's embedded numbers, escaping, bad input, the command. The page in a real
browser is tested in test_explore_browser.py."""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import vitviz
from vitviz.analyze import relevance_matrix, rollout_matrices, rollout_matrix
from vitviz.explorer._view import ExploreData, explore_payload, quantize_rows, render_explore
from vitviz.models import Preprocess

ODD = "<img src=x onerror=alert(1)> & \"q\" </script><!-- {{DATA}}"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(img=(32, 32), num_classes=5, labels=None, **kw):
    """A tiny timm ViT (random weights, 8 px patches) as a VisionModel with its preprocessing."""
    import timm

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=8,
                               embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=num_classes,
                               **kw).eval()
    pre = Preprocess(size=img, resize_mode="squash", crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    return vitviz.wrap(module, preprocess=pre, labels=labels)


def picture(h=40, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def decode(page: str):
    """The metadata and the data blocks embedded in a page, decoded as the page's script does."""
    meta = json.loads(re.search(r'<script type="application/json" id="vv-meta">(.*?)</script>', page, re.S).group(1))
    raw = dict(re.findall(r'<script type="application/octet-stream" id="vv-(\w+)">([^<]*)</script>', page))
    blocks = {k: base64.b64decode(v) for k, v in raw.items()}
    p, n = meta["prefix"], meta["tokens"]

    def rows(name):
        codes = np.frombuffer(blocks[name], np.uint8).reshape(-1, n - p).astype(np.float32)
        offset = np.frombuffer(blocks[name + "_o"], "<f4")
        scale = np.frombuffer(blocks[name + "_s"], "<f4")
        prefix = np.frombuffer(blocks[name + "_p"], "<f4").reshape(len(scale), p)
        return np.concatenate([prefix, offset[:, None] + codes * scale[:, None]], axis=1), scale  # [R, N], [R]

    return meta, blocks, rows


# ---------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------

def test_quantize_rows_golden():
    q = quantize_rows(np.array([[0.5, 0.1, 0.2, 0.4], [1.0, 0.0, 0.0, 0.0]]), 1)
    # (0.2 - 0.1) / ((0.4 - 0.1) / 255) = 85; the smallest patch value is 0, the largest 255;
    # a constant row has scale 0 and codes 0
    assert q.codes.tolist() == [[0, 85, 255], [0, 0, 0]]
    assert q.prefix.tolist() == [[0.5], [1.0]]
    np.testing.assert_allclose(q.offset, [0.1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(q.scale, [0.3 / 255, 0.0], rtol=1e-6)
    np.testing.assert_allclose(q.dequantize(), [[0.5, 0.1, 0.2, 0.4], [1.0, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_quantize_rows_error_bound_on_softmax_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 50, 50))
    rows = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [6, 50, 50], rows sum to 1
    q = quantize_rows(rows, 3)
    back = q.dequantize()
    span = rows[..., 3:].max(-1, keepdims=True) - rows[..., 3:].min(-1, keepdims=True)
    err = np.abs(back - rows)
    assert (err[..., 3:] <= span / 510 * (1 + 1e-4) + 1e-8).all()  # half a step of (max - min) / 255
    assert err[..., 3:].max() > span.min() / 2000  # not trivially exact
    np.testing.assert_array_equal(back[..., :3], rows[..., :3].astype(np.float32))  # prefix exact


# ---------------------------------------------------------------------------------------------
# the data of vitviz.explore against the analyzers
# ---------------------------------------------------------------------------------------------

def test_explore_matches_capture_rollout_and_relevance():
    m = tiny(reg_tokens=2)
    img = picture()
    e = vitviz.explore(m, img)
    d = e.data
    p = d.num_prefix
    assert p == 3 and d.prefix_names == ["CLS", "reg 0", "reg 1"] and d.grid == (4, 4)
    x = m.preprocess(img)
    with torch.no_grad(), vitviz.capture(m) as rec:
        logits = m(x)
    attn = rec.attentions
    np.testing.assert_allclose(d.attention, attn.tensor[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(d.attention.sum(-1), 1.0, atol=1e-5)
    # the rollout rows of every layer: R_l = Â_l … Â_1; the CLS row of the last one is vitviz.rollout
    for layer in range(attn.num_layers):
        upto = vitviz.AttentionMaps(attn.tensor[: layer + 1], attn.layout)
        np.testing.assert_allclose(d.rollout[layer], rollout_matrix(upto)[0].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d.rollout[layer][0, p:].reshape(4, 4), vitviz.rollout(upto)[0].numpy(),
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d.rollout.sum(-1), 1.0, atol=1e-5)
    # relevance of the predicted class: its CLS row is vitviz.relevance (Chefer et al.)
    heat = vitviz.relevance(m, x)[0]
    np.testing.assert_allclose(d.relevance[0, p:].reshape(4, 4), heat.numpy(), rtol=1e-4, atol=1e-6)
    # every row: R - I of the full relevance matrix (non-negative)
    with torch.enable_grad(), vitviz.capture(m, grad=True) as rec:
        xg = x.clone().requires_grad_(True)
        out = m(xg)
        out[0, out[0].argmax()].backward()
    full = relevance_matrix(rec.attentions, rec.attention_grads)[0].detach().numpy()
    np.testing.assert_allclose(d.relevance, full - np.eye(full.shape[0]), rtol=1e-4, atol=1e-6)
    assert (d.relevance >= 0).all()
    assert d.relevance_class == f"class {int(logits.argmax())}"
    # top-5: the softmax of the logits, most probable first
    prob = logits[0].softmax(-1)
    assert [c for c, _ in d.top5] == [f"class {i}" for i in prob.argsort(descending=True)[:5].tolist()]
    np.testing.assert_allclose([v for _, v in d.top5], prob.sort(descending=True).values[:5].numpy(), rtol=1e-5)


def test_rollout_matrices_every_layer_equals_rollout_matrix_batched():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 2, 2, 7, 7, generator=g)  # [L, B, H, N, N]
    attn = vitviz.AttentionMaps(a / a.sum(-1, keepdim=True), vitviz.TokenLayout(3, (2, 2)))
    for fusion, ratio in (("mean", 0.0), ("max", 0.5), ("min", 0.3)):
        r = rollout_matrices(attn, head_fusion=fusion, discard_ratio=ratio)  # [L, B, N, N]
        for layer in range(3):
            upto = vitviz.AttentionMaps(attn.tensor[: layer + 1], attn.layout)
            torch.testing.assert_close(r[layer], rollout_matrix(upto, head_fusion=fusion, discard_ratio=ratio))
            for b in range(2):  # one by one
                one = vitviz.AttentionMaps(attn.tensor[: layer + 1, b: b + 1], attn.layout)
                torch.testing.assert_close(r[layer, b: b + 1], rollout_matrix(one, head_fusion=fusion,
                                                                               discard_ratio=ratio))


def test_rollout_matrices_golden_two_layers():
    # one head, 1 prefix + 1x1 grid (N = 2): A1 = [[.5,.5],[.5,.5]], A2 = [[1,0],[0,1]]
    a1 = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    a2 = torch.eye(2)
    attn = vitviz.AttentionMaps(torch.stack([a1, a2])[:, None, None], vitviz.TokenLayout(1, (1, 1)))
    r = rollout_matrices(attn)[:, 0]  # [2, 2, 2]
    # Â1 = (A1 + I) / 2 = [[.75,.25],[.25,.75]]; Â2 = (I + I) / 2 = I; R_2 = Â2 Â1 = Â1
    expect = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    torch.testing.assert_close(r[0], expect)
    torch.testing.assert_close(r[1], expect)


def test_page_blocks_decode_to_the_data_within_the_quantisation_bound():
    m = tiny()
    d = vitviz.explore(m, picture()).data
    meta, blocks, rows = decode(render_explore(d))
    num_layers, heads, n, _ = d.attention.shape
    assert (meta["layers"], meta["heads"], meta["tokens"], meta["grid"]) == (num_layers, heads, n, [4, 4])
    assert meta["head_layers"] == list(range(num_layers)) and meta["dropped"] == []
    p = d.num_prefix
    for name, ref in (("mean", d.attention.mean(1)), ("max", d.attention.max(1)), ("heads", d.attention),
                      ("rollout", d.rollout), ("relevance", d.relevance)):
        got, scale = rows(name)
        ref = ref.reshape(-1, n)
        assert got.shape == ref.shape, name
        np.testing.assert_array_equal(got[:, :p], ref[:, :p].astype(np.float32))
        assert (np.abs(got[:, p:] - ref[:, p:]) <= scale[:, None] * 0.5 * (1 + 1e-4) + 1e-8).all(), name


def test_per_head_rows_of_the_earliest_layers_are_dropped_to_fit():
    d = vitviz.explore(tiny(), picture()).data
    full = len(render_explore(d))
    meta, blocks, = explore_payload(d, max_bytes=full - 1)  # no room for the first layer's heads
    num_layers = d.attention.shape[0]
    assert meta["head_layers"] == list(range(1, num_layers))  # the last layers are kept
    assert "layer 0 were left out" in meta["dropped"][0]  # layers numbered from 0, as layer=
    page = render_explore(d, max_bytes=full - 1)
    assert len(page) < full and "layer 0 were left out" in page
    meta, _ = explore_payload(d, max_bytes=1)
    assert meta["head_layers"] == [] and "layers 0–2 were left out" in meta["dropped"][0]
    assert "over the 1e-06 MB" in meta["dropped"][1]


# ---------------------------------------------------------------------------------------------
# layouts, escaping, bad input
# ---------------------------------------------------------------------------------------------

def test_non_square_grid_and_distillation_token():
    import timm

    torch.manual_seed(0)
    module = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=(32, 48),
                               patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4).eval()
    pre = Preprocess(size=(32, 48), resize_mode="squash", crop_pct=1.0)
    m = vitviz.wrap(module, preprocess=pre)
    e = vitviz.explore(m, picture(50, 70))
    d = e.data
    assert d.grid == (4, 6) and d.prefix_names == ["CLS", "dist"] and d.image.shape == (32, 48, 3)
    meta, _, rows = decode(e.html)
    assert meta["grid"] == [4, 6] and meta["size"] == [32, 48]
    assert rows("mean")[0].shape == (2 * 26, 26)


def test_names_are_escaped_in_the_page_and_the_iframe():
    m = tiny(labels=[ODD, "b", "c", "d", "e"])
    e = vitviz.explore(m, picture(), title=ODD, target=0)
    page = e.html
    assert ODD not in page and "<img src=x" not in page
    assert html.escape(ODD, quote=True) in page  # the title, as text
    assert page.count("</script>") == page.count("<script")  # no script closed early
    meta, _, _ = decode(page)
    assert meta["title"] == ODD and meta["relevance_class"] == ODD  # JSON strings survive intact
    assert ODD in [c for c, _ in meta["top5"]]
    frame = e._repr_html_()
    srcdoc = re.fullmatch(r'<iframe srcdoc="([^"]*)" [^<>]*></iframe>', frame).group(1)
    assert "<" not in srcdoc and html.unescape(srcdoc) == page  # the same page, one attribute


def test_file_name_is_the_title(tmp_path):
    path = tmp_path / "a <b> & c.png"
    Image.fromarray(picture()).save(path)
    e = vitviz.explore(tiny(), str(path))
    assert e.data.title == "a <b> & c.png"
    assert "<title>a &lt;b&gt; &amp; c.png · vitviz explorer</title>" in e.html
    out = e.save(tmp_path / "sub" / "page.html")
    assert out.read_text(encoding="utf-8") == e.html
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]  # no temporary file left


def test_bad_images_and_batches(tmp_path):
    m = tiny()
    truncated = tmp_path / "cut.png"
    Image.fromarray(picture()).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for bad in (truncated, tmp_path / "missing.png"):
        with pytest.raises(vitviz.ImageError, match=bad.name):
            vitviz.explore(m, str(bad))
    with pytest.raises(vitviz.VitvizError, match="batch of 2"):
        vitviz.explore(m, torch.zeros(2, 3, 32, 32))


def test_tensor_input_and_a_model_without_classifier():
    m = tiny(num_classes=0)
    img = picture(32, 32)
    x = m.preprocess(img)
    e = vitviz.explore(m, x)
    d = e.data
    assert d.relevance is None and d.top5 == []
    assert np.abs(d.image.astype(int) - img.astype(int)).max() <= 1  # un-normalised back to the picture
    meta, blocks, _ = decode(e.html)
    assert not meta["has_relevance"] and "relevance" not in blocks and "not classifier logits" in e.html


def test_explore_command(tmp_path, capsys):
    from vitviz.cli import main

    a = tmp_path / "a.png"
    Image.fromarray(picture()).save(a)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "page.html"
    assert main(["explore", str(a), "--model", "shapes-vit", "--out", str(out)]) == 0
    assert out.is_file() and "vitviz explorer" in out.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["explore", str(a), str(tmp_path / "broken.png"), "--model", "shapes-vit",
                 "--out", str(tmp_path / "pages")]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["a_explore.html"]
    assert main(["explore", str(a), str(a), "--model", "shapes-vit", "--out", str(out)]) == 2


def test_explore_data_checks_shapes():
    d = ExploreData(image=picture(8, 8), attention=np.full((1, 1, 5, 5), 0.2, np.float32), num_prefix=1,
                    grid=(2, 3), prefix_names=["CLS"])
    with pytest.raises(ValueError, match="do not fit"):
        render_explore(d)


def test_gallery_explore_writes_and_links_a_page_per_image(tmp_path):
    from vitviz.gallery import build_gallery
    from vitviz.zoo.scenes import classification_scene

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(classification_scene(3_000_000 + i).image).save(src / f"s{i} #&.png")
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    m = vitviz.load_model("shapes-vit")
    result = build_gallery(src, m, tmp_path / "g", methods="rollout", workers=0, progress=False, explore=True)
    done = [r for r in result.records if r["status"] == "done"]
    assert len(done) == 2 and len(result.skipped) == 1
    manifest = [json.loads(line) for line in (tmp_path / "g" / "manifest.jsonl").read_text().splitlines()]
    pages = {r["key"]: r.get("explore") for r in manifest}
    assert sorted(p for p in pages.values() if p) == ["explore/s0.html", "explore/s1.html"]
    for key, rel in pages.items():
        if rel:
            page = (tmp_path / "g" / rel).read_text(encoding="utf-8")
            assert f"<title>{html.escape(key)} · vitviz explorer</title>" in page
    index = (tmp_path / "g" / "index.html").read_text(encoding="utf-8")
    assert index.count('href="explore/s0.html"') == 1 and index.count('href="explore/s1.html"') == 1
    # a resumed run keeps the pages
    before = (tmp_path / "g" / "explore" / "s0.html").stat().st_mtime_ns
    build_gallery(src, m, tmp_path / "g", methods="rollout", workers=0, progress=False, explore=True)
    assert (tmp_path / "g" / "explore" / "s0.html").stat().st_mtime_ns == before


def test_models_whose_attention_cannot_be_shown_get_the_capture_error():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, 8), torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
    with pytest.raises(vitviz.CaptureError, match="no self-attention over image tokens"):
        vitviz.explore(vitviz.wrap(net, grid=(4, 4), num_prefix=0), torch.zeros(1, 3, 32, 32))
    compiled = vitviz.wrap(torch.compile(tiny().module))
    with pytest.raises(vitviz.CaptureError, match="torch.compile"):
        vitviz.explore(compiled, torch.zeros(1, 3, 32, 32))


def test_model_without_cls_token():
    m = tiny(class_token=False, global_pool="avg")
    e = vitviz.explore(m, picture())
    d = e.data
    assert d.num_prefix == 0 and d.prefix_names == []
    x = m.preprocess(picture())
    with torch.no_grad(), vitviz.capture(m) as rec:
        m(x)
    # rollout without CLS: the mean of the patch rows of R_L
    np.testing.assert_allclose(d.rollout[-1].mean(0).reshape(4, 4), vitviz.rollout(rec.attentions)[0].numpy(),
                               rtol=1e-5, atol=1e-7)
    meta, blocks, rows = decode(e.html)
    assert meta["prefix"] == 0 and blocks["mean_p"] == b""
    np.testing.assert_allclose(rows("mean")[0], d.attention.mean(1).reshape(-1, 16), atol=1e-3)


def test_transformers_classifier_with_labels():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3,
                                 id2label={0: "cat", 1: "dog <b>", 2: "fox"},
                                 label2id={"cat": 0, "dog <b>": 1, "fox": 2})
    module = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e = vitviz.explore(vitviz.wrap(module), x)
    d = e.data
    assert d.grid == (4, 4) and d.prefix_names == ["CLS"]
    assert sorted(c for c, _ in d.top5) == ["cat", "dog <b>", "fox"]
    with torch.no_grad():
        logits = module(pixel_values=x).logits[0]
    assert d.top5[0][0] == cfg.id2label[int(logits.argmax())]
    heat = vitviz.relevance(vitviz.wrap(module), x)[0]
    np.testing.assert_allclose(d.relevance[0, 1:].reshape(4, 4), heat.numpy(), rtol=1e-4, atol=1e-6)
    assert "dog <b>" not in e.html
