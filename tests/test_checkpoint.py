"""Reading weight files safely, and pytorch_pretrained_vit checkpoints loaded into timm.

The source of truth for the conversion is pytorch_pretrained_vit itself: its ``ViT``
(random weights) and the timm ``VisionTransformer`` loaded with the converted weights
must give the same logits and the same attention (``block.attn.scores``).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import pytorch_pretrained_vit as ppvit
import timm
import torch
from PIL import Image
from pytorch_pretrained_vit.configs import PRETRAINED_MODELS
from safetensors.torch import save_file
from torch import nn

import vitviz
from vitviz.errors import CheckpointError
from vitviz.models._checkpoint_convert import (
    convert_pytorch_pretrained_vit,
    infer_timm_args,
    is_pytorch_pretrained_vit,
    load_into_timm,
)
from vitviz.models._checkpoint_read import read_state_dict

# Small model with the structure of 'B_16_imagenet1k' (patches 16, classifier 'token',
# no representation layer), built through the same named-config code path.
SMALL = dict(dim=64, ff_dim=128, num_heads=4, num_layers=2)
NUM_CLASSES = 37


def _ppvit(monkeypatch, image_size=64, representation_size=None, load_repr_layer=False,
           seed=0) -> nn.Module:
    """A pytorch_pretrained_vit.ViT like 'B_16_imagenet1k', small, with every weight random.

    ``ViT(name=None, ...)`` raises NameError in 0.0.7 (see test_ppvit_unnamed_constructor_is_broken),
    so the small configuration is registered under a name, next to B_16_imagenet1k.
    """
    entry = copy.deepcopy(PRETRAINED_MODELS["B_16_imagenet1k"])
    entry["config"].update(SMALL, representation_size=representation_size)
    entry["url"] = None
    monkeypatch.setitem(PRETRAINED_MODELS, "B_16_imagenet1k_small", entry)
    torch.manual_seed(seed)
    m = ppvit.ViT("B_16_imagenet1k_small", pretrained=False, image_size=image_size,
                  num_classes=NUM_CLASSES, load_repr_layer=load_repr_layer)
    _randomise(m)
    return m.eval()


@torch.no_grad()
def _randomise(m: nn.Module) -> None:
    # the library zero-initialises fc and class_token and gives biases std 1e-6: with those a
    # swapped bias or head would go unnoticed, so every parameter gets visible noise
    for p in m.parameters():
        p.add_(0.1 * torch.randn_like(p))


def _timm_vit(img_size=64, **kw) -> nn.Module:
    args = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=NUM_CLASSES, img_size=img_size)
    args.update(kw)
    return timm.create_model("vit_base_patch16_224", pretrained=False, **args).eval()


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "b.running_mean": torch.randn(5, generator=g).half()}


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".PTH"])
def test_read_each_format_round_trip(tmp_path, suffix):
    sd = _sd()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    out = read_state_dict(path)
    assert type(out) is dict
    _assert_same(sd, out)
    _assert_same(sd, read_state_dict(str(path)))


def test_misnamed_files_read_by_content(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "really_torch.safetensors")
    _assert_same(sd, read_state_dict(tmp_path / "really_torch.safetensors"))
    save_file(sd, str(tmp_path / "really_safetensors.pth"))
    _assert_same(sd, read_state_dict(tmp_path / "really_safetensors.pth"))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "module", "ema", "model_ema"])
def test_nested_checkpoints_are_unwrapped(tmp_path, key):
    sd = _sd()
    path = tmp_path / "ckpt.pth"
    torch.save({key: sd, "epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
    _assert_same(sd, read_state_dict(path))


def test_live_weights_preferred_over_ema_and_double_nesting(tmp_path):
    live, ema = _sd(0), _sd(1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model_ema": ema, "model": live}, path)
    _assert_same(live, read_state_dict(path))
    torch.save({"ema": ema}, path)  # only an EMA copy: use it
    _assert_same(ema, read_state_dict(path))
    torch.save({"checkpoint": 1, "state_dict": {"model": live}}, path)
    _assert_same(live, read_state_dict(path))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module.model.", "_orig_mod.module."])
def test_wrapper_prefix_stripped(tmp_path, prefix):
    sd = _sd()
    path = tmp_path / "ddp.safetensors"
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    _assert_same(sd, read_state_dict(path))


def test_prefix_kept_when_not_on_every_key(tmp_path):
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1), "model.c": torch.ones(2)}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    assert list(read_state_dict(path)) == ["module.a", "b", "model.c"]


def _mark(path):  # what the malicious pickle below would run when unpickled
    with open(path, "w") as f:
        f.write("code ran")
    return {}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_mark, (self.marker,))


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "arbitrary code execution" in msg
    assert "torch.nn.modules.container.Sequential" in msg
    assert "torch.save(model.state_dict()" in msg and "safetensors" in msg


def test_custom_object_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Evil(str(marker))}, path)
    # the payload is real: plain unpickling runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="arbitrary code execution") as e:
        read_state_dict(path)
    assert str(path) in str(e.value) and "_mark" in str(e.value)
    assert not marker.exists()


def test_numpy_arrays_refused(tmp_path):
    import numpy as np

    path = tmp_path / "np.pth"
    torch.save({"w": np.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="arbitrary code execution"):
        read_state_dict(path)


def test_plain_pickle_refused(tmp_path):
    path = tmp_path / "plain.pkl.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(2)}, f, protocol=4)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    assert str(e.value).startswith(f"{path}: uses pickle features that weights-only loading refuses")
    assert "arbitrary code execution" in str(e.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_garbage_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint at all\n" * 20)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    assert str(path) in str(e.value) and "not a" in str(e.value)


def test_truncated_torch_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(_sd(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable PyTorch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.\w+: the file is empty"):
        read_state_dict(path)


def test_missing_file_directory_and_unknown_extension(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: no such weights file"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    assert "weights.npz" in str(e.value) and "'.npz'" in str(e.value) and ".safetensors" in str(e.value)


def test_content_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="t.pth: holds a Tensor, not a dict of tensors"):
        read_state_dict(path)
    torch.save({}, path)
    with pytest.raises(CheckpointError, match="empty dict"):
        read_state_dict(path)
    torch.save({"epoch": 3, "w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"not a state dict .*'epoch'"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------
# pytorch_pretrained_vit -> timm
# --------------------------------------------------------------------------------------------

def test_ppvit_unnamed_constructor_is_broken():
    """Library fact the helper above works around: ViT(name=None) reads an undefined name.

    When this starts failing, pytorch_pretrained_vit was fixed and the small model can be
    built with ViT(patches=16, dim=64, ...) directly."""
    with pytest.raises(NameError, match="resize_positional_embedding"):
        ppvit.ViT(dim=64, ff_dim=128, num_heads=4, num_layers=2, image_size=64, num_classes=NUM_CLASSES)


def test_detection(monkeypatch):
    sd = _ppvit(monkeypatch).state_dict()
    assert is_pytorch_pretrained_vit(sd)
    assert not is_pytorch_pretrained_vit(_timm_vit().state_dict())
    assert not is_pytorch_pretrained_vit(_sd())


def test_converted_keys_and_qkv_layout(monkeypatch):
    m = _ppvit(monkeypatch)
    sd = m.state_dict()
    out = convert_pytorch_pretrained_vit(sd)
    assert set(out) == set(_timm_vit().state_dict())
    # q rows first, then k, then v (timm reshapes qkv output as [B, N, 3, H, D])
    w = out["blocks.1.attn.qkv.weight"]  # [3C, C]
    b = out["blocks.1.attn.qkv.bias"]  # [3C]
    assert w.shape == (192, 64) and b.shape == (192,)
    attn = m.transformer.blocks[1].attn
    for i, proj in enumerate([attn.proj_q, attn.proj_k, attn.proj_v]):
        assert torch.equal(w[64 * i:64 * (i + 1)], proj.weight)
        assert torch.equal(b[64 * i:64 * (i + 1)], proj.bias)
    assert out["cls_token"] is sd["class_token"]
    assert out["head.weight"] is sd["fc.weight"]
    assert out["blocks.0.attn.proj.weight"] is sd["transformer.blocks.0.proj.weight"]
    assert out["blocks.0.mlp.fc2.bias"] is sd["transformer.blocks.0.pwff.fc2.bias"]


def _attention_of_ppvit(m) -> torch.Tensor:
    return torch.stack([blk.attn.scores for blk in m.transformer.blocks])  # [L, B, H, N, N]


def test_converted_checkpoint_same_logits_and_attention(monkeypatch, tmp_path):
    """THE key test: a saved pytorch_pretrained_vit checkpoint in timm computes the same thing."""
    src = _ppvit(monkeypatch, image_size=64)
    path = tmp_path / "ppvit_b16_small.pth"
    torch.save(src.state_dict(), path)

    sd = read_state_dict(path)
    assert is_pytorch_pretrained_vit(sd)
    model = _timm_vit(img_size=64)
    notes = load_into_timm(model, convert_pytorch_pretrained_vit(sd), source=str(path))
    assert notes == []  # nothing adapted: same grid, already converted

    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = src(x)  # [B, 37]
        want_attn = _attention_of_ppvit(src)  # [L, B, H, N, N]
        with vitviz.capture(vitviz.wrap(model)) as rec:
            got = model(x)  # [B, 37]
    assert want.abs().max() > 0.1  # a real head, not zeros compared with zeros
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    attn = rec.attentions.tensor  # [L, B, H, N, N]
    assert attn.shape == (2, 3, 4, 17, 17) == want_attn.shape
    assert rec.attentions.layout.grid == (4, 4) and rec.attentions.layout.num_prefix == 1
    torch.testing.assert_close(attn, want_attn, atol=1e-6, rtol=1e-5)
    assert want_attn.amax() > 2 / 17  # attention is not uniform: the comparison has content


def test_load_into_timm_converts_by_itself(monkeypatch, tmp_path):
    src = _ppvit(monkeypatch, image_size=64)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    model = _timm_vit(img_size=64)
    notes = load_into_timm(model, read_state_dict(path), source=path.name)
    assert notes == ["w.safetensors: converted pytorch_pretrained_vit keys to timm"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_at_64px_into_model_at_96px(monkeypatch, tmp_path):
    src = _ppvit(monkeypatch, image_size=64)  # 4x4 grid
    path = tmp_path / "b16_64px.pth"
    torch.save(src.state_dict(), path)
    sd = convert_pytorch_pretrained_vit(read_state_dict(path))
    old_pos = sd["pos_embed"].clone()  # [1, 17, 64]

    model = _timm_vit(img_size=96)  # 6x6 grid
    notes = load_into_timm(model, sd, source=path.name)
    assert notes == ["b16_64px.pth: resampled the position embedding from a 4x4 to a 6x6 patch grid "
                     "(timm resample_abs_pos_embed, bicubic)"]
    assert torch.equal(sd["pos_embed"], old_pos)  # the caller's dict is not modified
    pos = model.pos_embed.detach()  # [1, 37, 64]
    assert pos.shape == (1, 37, 64)
    assert torch.equal(pos[:, :1], old_pos[:, :1])  # the CLS position is kept as it is
    want = timm.layers.resample_abs_pos_embed(old_pos, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(pos, want, atol=0, rtol=0)
    # the other weights are the checkpoint's
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])

    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad(), vitviz.capture(vitviz.wrap(model)) as rec:
        y = model(x)  # [B, 37]
    assert y.shape == (2, NUM_CLASSES) and torch.isfinite(y).all()
    assert rec.attentions.tensor.shape == (2, 2, 4, 37, 37)
    assert rec.attentions.layout.grid == (6, 6)


def test_non_square_checkpoint_grid(tmp_path):
    src = _timm_vit(img_size=(64, 96))  # 4x6 = 24 patches: not a square
    sd = src.state_dict()
    same = _timm_vit(img_size=(64, 96))
    assert load_into_timm(same, sd, source="rect.pth") == []  # same grid: loaded as is
    model = _timm_vit(img_size=96)
    with pytest.raises(CheckpointError, match=r"rect.pth: .*24 patch rows .*not a square grid.*checkpoint_grid"):
        load_into_timm(model, sd, source="rect.pth")
    with pytest.raises(CheckpointError, match="checkpoint_grid=\\(5, 5\\) holds 25 patches"):
        load_into_timm(model, sd, source="rect.pth", checkpoint_grid=(5, 5))
    notes = load_into_timm(model, sd, source="rect.pth", checkpoint_grid=(4, 6))
    assert "from a 4x6 to a 6x6" in notes[0]
    want = timm.layers.resample_abs_pos_embed(sd["pos_embed"], new_size=[6, 6], old_size=[4, 6])
    torch.testing.assert_close(model.pos_embed.detach(), want, atol=0, rtol=0)


def test_other_number_of_classes_says_which(monkeypatch):
    sd = convert_pytorch_pretrained_vit(_ppvit(monkeypatch).state_dict())
    with pytest.raises(CheckpointError) as e:
        load_into_timm(_timm_vit(num_classes=1000), sd, source="pets.pth")
    msg = str(e.value)
    assert msg.startswith("pets.pth: ") and "37 classes" in msg and "1000" in msg
    assert "--num-classes 37" in msg
    with pytest.raises(CheckpointError, match="--num-classes 37"):
        load_into_timm(_timm_vit(num_classes=0), sd, source="pets.pth")


def test_missing_and_unexpected_keys_listed_with_counts(monkeypatch):
    sd = convert_pytorch_pretrained_vit(_ppvit(monkeypatch).state_dict())
    with pytest.raises(CheckpointError) as e:
        load_into_timm(_timm_vit(depth=3), sd, source="ck.pth")
    msg = str(e.value)
    assert "12 missing keys" in msg and "blocks.2.attn.qkv.weight" in msg and "(7 more)" in msg
    assert "unexpected" not in msg
    assert "depth=2" in msg and "embed_dim=64" in msg and "num_heads is not stored" in msg

    extra = dict(sd, **{f"extra.{i}": torch.zeros(1) for i in range(7)})
    del extra["norm.bias"]
    with pytest.raises(CheckpointError) as e:
        load_into_timm(_timm_vit(), extra, source="ck.pth")
    msg = str(e.value)
    assert "1 missing keys (norm.bias)" in msg
    assert "7 unexpected keys (extra.0, extra.1, extra.2, extra.3, extra.4, ... (2 more))" in msg


def test_other_shapes_reported(monkeypatch):
    sd = convert_pytorch_pretrained_vit(_ppvit(monkeypatch).state_dict())
    with pytest.raises(CheckpointError) as e:
        load_into_timm(_timm_vit(mlp_ratio=4), sd, source="ck.pth")
    msg = str(e.value)
    assert "6 weights have other shapes" in msg  # fc1 weight+bias, fc2 weight, x2 blocks
    assert "blocks.0.mlp.fc1.weight (128, 64) vs model (256, 64)" in msg and "mlp_ratio=2.0" in msg


def test_infer_timm_args(monkeypatch):
    sd = _ppvit(monkeypatch, image_size=64).state_dict()
    args = infer_timm_args(sd)
    assert args == dict(embed_dim=64, depth=2, in_chans=3, patch_size=16, mlp_ratio=2.0,
                        num_classes=NUM_CLASSES, qkv_bias=True, class_token=True, img_size=64)
    assert "num_heads" not in args
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_heads=4, **args)
    assert load_into_timm(model, sd, source="x")  # converted, fits exactly
    rect = infer_timm_args(_timm_vit(img_size=(64, 96)).state_dict())
    assert "img_size" not in rect and rect["embed_dim"] == 64
    with pytest.raises(CheckpointError, match="not a timm VisionTransformer"):
        infer_timm_args(_sd())


def test_unknown_keys_and_missing_class_token_refused(monkeypatch):
    sd = _ppvit(monkeypatch).state_dict()
    with pytest.raises(CheckpointError, match=r"1 keys the converter does not know, e\.g\. \['head_extra'\]"):
        convert_pytorch_pretrained_vit(dict(sd, head_extra=torch.zeros(1)))
    no_cls = {k: v for k, v in sd.items() if k != "class_token"}
    with pytest.raises(CheckpointError, match="no 'class_token'"):
        convert_pytorch_pretrained_vit(no_cls)
    no_v = {k: v for k, v in sd.items() if k != "transformer.blocks.1.attn.proj_v.bias"}
    with pytest.raises(CheckpointError, match=r"block 1 .*proj_v\.bias"):
        convert_pytorch_pretrained_vit(no_v)
    with pytest.raises(CheckpointError, match="not from pytorch_pretrained_vit"):
        convert_pytorch_pretrained_vit(_sd())


def test_pre_logits_refused_or_dropped_as_the_library_does(monkeypatch):
    with_repr = _ppvit(monkeypatch, representation_size=64, load_repr_layer=True)
    sd = with_repr.state_dict()
    assert "pre_logits.weight" in sd
    with pytest.raises(CheckpointError, match="pre_logits.bias, pre_logits.weight.*drop_pre_logits=True"):
        convert_pytorch_pretrained_vit(sd)
    with pytest.raises(CheckpointError, match="representation layer"):
        load_into_timm(_timm_vit(), sd, source="b16_21k.pth")

    # drop_pre_logits=True gives the model the library builds by default (load_repr_layer=False)
    default = _ppvit(monkeypatch, representation_size=64, load_repr_layer=False, seed=1)
    assert not hasattr(default, "pre_logits")
    default.load_state_dict({k: v for k, v in sd.items() if not k.startswith("pre_logits.")})
    model = _timm_vit()
    load_into_timm(model, sd, source="b16_21k.pth", drop_pre_logits=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), default(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(with_repr(x), default(x), atol=1e-3)  # the layer mattered


def test_full_size_b16_imagenet1k(tmp_path):
    """The real 'B_16_imagenet1k' dimensions (768 wide, 12 layers, 12 heads, 384 px), 37 classes.

    Random weights (no download); 12-21 s on this machine's 2 shared CPU cores."""
    torch.manual_seed(0)
    src = ppvit.ViT("B_16_imagenet1k", pretrained=False, num_classes=NUM_CLASSES).eval()
    _randomise(src)
    path = tmp_path / "B_16_imagenet1k_pets.pth"
    torch.save(src.state_dict(), path)  # what users of that library save
    # the documented path: --model b16 --weights FILE --num-classes 37 --image-size 384
    vm = vitviz.load_model("b16", weights=str(path), num_classes=NUM_CLASSES, image_size=384)
    model = vm.module
    assert model.default_cfg["architecture"] == "vit_base_patch16_384"

    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = src(x)  # [1, 37]
        want_attn = _attention_of_ppvit(src)  # [12, 1, 12, 577, 577]
        with vitviz.capture(vm) as rec:
            got = vm(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert rec.attentions.tensor.shape == (12, 1, 12, 577, 577)
    assert rec.attentions.layout.grid == (24, 24)
    torch.testing.assert_close(rec.attentions.tensor, want_attn, atol=1e-6, rtol=1e-5)

    from vitviz.cli import main

    image = tmp_path / "pet.png"
    Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)).save(image)
    code = main(["rollout", str(image), "--model", "b16", "--weights", str(path), "--num-classes",
                 str(NUM_CLASSES), "--image-size", "384", "--out", str(tmp_path / "out")])
    assert code == 0
    assert np.load(tmp_path / "out" / "pet_rollout.npy").shape == (24, 24)
