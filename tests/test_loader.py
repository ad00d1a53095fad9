"""load_model: aliases, unknown names, the local caches, --weights, --random, transformers dirs."""

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitviz
from vitviz.errors import ModelNotFoundError, VitvizError, WeightsNotFoundError
from vitviz.models._loader import resolve


def test_aliases_resolve_to_timm_models_and_sizes():
    assert "b16" in vitviz.list_models()
    assert resolve("b16").model_id == "vit_base_patch16_224"
    assert resolve("b16", 384).model_id == "vit_base_patch16_384"
    assert resolve("b16-384").model_id == "vit_base_patch16_384"
    r = resolve("b16", 320)
    assert r.model_id == "vit_base_patch16_224" and not r.exact_size
    for alias in vitviz.list_models():
        r = resolve(alias)
        if r.source == "timm":
            assert timm.is_model(r.model_id), alias


def test_unknown_name_lists_close_names():
    with pytest.raises(ModelNotFoundError) as e:
        vitviz.load_model("b61", pretrained=False)
    assert "b16" in str(e.value)
    with pytest.raises(ModelNotFoundError) as e:
        vitviz.load_model("vit_base_patch16_22", pretrained=False)
    assert "vit_base_patch16_224" in str(e.value)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    return cache


def test_missing_weights_fail_fast_with_the_three_fixes(empty_hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as e:
        vitviz.load_model("ti16")
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "timm/vit_tiny_patch16_224" in msg and str(empty_hf_cache) in msg
    assert "--weights FILE" in msg and "--random" in msg and "network" in msg
    assert elapsed < 10  # no network retries (they take about a minute here)


def _fake_hf_cache_file(cache, repo, filename, revision="0" * 40):
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / revision
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snap / filename


def test_pretrained_weights_load_from_the_local_hf_cache(empty_hf_cache):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = _fake_hf_cache_file(empty_hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                               "model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    m = vitviz.load_model("ti16")
    for k, v in ref.state_dict().items():
        assert torch.equal(m.module.state_dict()[k], v), k
    assert m.labels is not None and len(m.labels) == 1000  # ImageNet names from timm's own files
    # num_classes on top of pretrained weights: a fresh head
    m5 = vitviz.load_model("ti16", num_classes=5)
    assert m5.module.head.out_features == 5
    assert torch.equal(m5.module.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_random_builds_the_architecture_without_weights(empty_hf_cache):
    m = vitviz.load_model("deit-ti-distilled", pretrained=False, num_classes=3)
    assert m.layout == vitviz.TokenLayout(num_prefix=2, grid=(14, 14))
    assert m.module.head.out_features == 3
    assert not m.module.training
    m = vitviz.load_model("ti16", pretrained=False, image_size=160)
    assert m.layout.grid == (10, 10) and m.input_size == (160, 160)


def test_weights_file_infers_classes_and_size(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=96)
    f = tmp_path / "ft.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, f)
    m = vitviz.load_model("ti16", weights=str(f))
    assert m.module.head.out_features == 7 and m.layout.grid == (6, 6)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(m(x), src.eval()(x), atol=1e-5)
    # and at another size: position embeddings interpolated
    m2 = vitviz.load_model("ti16", weights=str(f), image_size=128)
    assert m2.layout.grid == (8, 8)
    with torch.no_grad():
        assert m2(torch.randn(1, 3, 128, 128)).shape == (1, 7)


def test_weights_and_random_exclude_each_other(tmp_path):
    with pytest.raises(VitvizError, match="exclude"):
        vitviz.load_model("ti16", weights=str(tmp_path / "x.pth"), pretrained=False)


def test_transformers_local_directory(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                    label2id={"cat": 0, "dog": 1, "fox": 2})
    ref = ViTForImageClassification(cfg).eval()
    ref.save_pretrained(tmp_path / "vit")
    m = vitviz.load_model(str(tmp_path / "vit"))
    assert m.labels == ["cat", "dog", "fox"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = ref(x).logits
    with vitviz.capture(m) as rec, torch.no_grad():
        out = m(x).logits
    assert torch.allclose(out, expect, atol=1e-5)
    assert rec.attentions.layout == vitviz.TokenLayout(1, (4, 4))


def test_transformers_id_not_cached(empty_hf_cache):
    with pytest.raises(WeightsNotFoundError) as e:
        vitviz.load_model("google/vit-base-patch16-224")
    assert "google/vit-base-patch16-224" in str(e.value) and "--random" in str(e.value)


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(VitvizError, match="no CUDA"):
            vitviz.load_model("ti16", pretrained=False, device="cuda")
