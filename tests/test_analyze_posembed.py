"""Position-embedding similarity: equal to the cosine matrix computed directly from each
library's own parameter (timm with and without a CLS position, transformers, CLIP,
pytorch_pretrained_vit, hand-written), after interpolation, and the pure analyzer."""

import pytest
import timm
import torch
from torch import nn

import vitviz
from vitviz import LayoutError
from vitviz.analyze.posembed import pos_similarity_matrix, resample_grid
from vitviz.models._pos_params import find_position_table, patch_position_embeddings, pos_similarity


def direct_cosine(rows: torch.Tensor, grid) -> torch.Tensor:
    """The reference: cosine similarity of every pair of rows, written out."""
    rows = rows.detach().double()
    p = rows.shape[0]
    out = torch.empty(p, p, dtype=torch.float64)
    for i in range(p):
        out[i] = nn.functional.cosine_similarity(rows[i][None], rows, dim=-1)
    return out.reshape(p, *grid).float()


def test_analyzer_golden():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])  # 2x2 grid
    sim = pos_similarity_matrix(e, (2, 2))
    s = 2 ** -0.5
    assert sim.shape == (4, 2, 2)
    assert torch.allclose(sim[0].flatten(), torch.tensor([1.0, 0.0, -1.0, s]))
    assert torch.allclose(sim[3].flatten(), torch.tensor([s, s, -s, 1.0]))
    assert torch.allclose(sim, sim.flatten(1).T.reshape(4, 2, 2))  # symmetric
    with pytest.raises(LayoutError, match="2x3"):
        pos_similarity_matrix(e, (2, 3))


def test_timm_with_cls_position():
    m = vitviz.wrap(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3))
    sim = vitviz.models._pos_params.pos_similarity(m)
    assert sim.shape == (16, 4, 4)
    assert torch.allclose(sim, direct_cosine(m.module.pos_embed[0, 1:], (4, 4)), atol=1e-6)
    # the CLS position is not a patch: including it would shift every row by one
    assert not torch.allclose(sim, direct_cosine(m.module.pos_embed[0, :16], (4, 4)), atol=1e-3)


def test_timm_distilled_two_prefix_positions():
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=48, num_classes=3)
    sim = pos_similarity(m)  # a plain module is wrapped
    assert sim.shape == (9, 3, 3)
    assert torch.allclose(sim, direct_cosine(m.pos_embed[0, 2:], (3, 3)), atol=1e-6)


def test_timm_no_embed_class_registers():
    # DINOv2 with registers: pos_embed holds only the patch positions (no_embed_class=True)
    m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                          embed_dim=32, depth=1, num_heads=2)
    assert m.no_embed_class and m.num_prefix_tokens == 5 and m.pos_embed.shape[1] == 16
    sim = pos_similarity(m)
    assert torch.allclose(sim, direct_cosine(m.pos_embed[0], (4, 4)), atol=1e-6)


def test_model_built_at_another_image_size_and_interpolation():
    m = vitviz.load_model("ti16", pretrained=False, image_size=96)  # 6x6 instead of 14x14
    sim = vitviz.models._pos_params.pos_similarity(m)
    assert sim.shape == (36, 6, 6)
    assert torch.allclose(sim, direct_cosine(m.module.pos_embed[0, 1:], (6, 6)), atol=1e-6)
    # grid=: the embeddings as timm interpolates them for a 10x8 input
    from timm.layers import resample_abs_pos_embed

    timm_resized = resample_abs_pos_embed(m.module.pos_embed.detach(), [10, 8], old_size=[6, 6],
                                          num_prefix_tokens=1)
    assert torch.allclose(patch_position_embeddings(m, grid=(10, 8)), timm_resized[0, 1:], atol=1e-6)
    assert torch.allclose(pos_similarity(m, grid=(10, 8)), direct_cosine(timm_resized[0, 1:], (10, 8)),
                          atol=1e-5)


def test_transformers_vit_deit_and_clip():
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        DeiTConfig,
        DeiTModel,
        ViTConfig,
        ViTForImageClassification,
    )

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 image_size=32, patch_size=8)
    vit = ViTForImageClassification(ViTConfig(**small, num_labels=3))
    table = vit.vit.embeddings.position_embeddings  # [1, 1 + 16, 32]
    assert torch.allclose(pos_similarity(vit), direct_cosine(table[0, 1:], (4, 4)), atol=1e-6)

    deit = DeiTModel(DeiTConfig(**small))
    with torch.no_grad():  # transformers zero-initialises DeiT's table: give it values
        nn.init.normal_(deit.embeddings.position_embeddings)
    table = deit.embeddings.position_embeddings  # [1, 2 + 16, 32]: CLS, distillation, patches
    assert torch.allclose(pos_similarity(deit), direct_cosine(table[0, 2:], (4, 4)), atol=1e-6)

    clip = CLIPVisionModel(CLIPVisionConfig(**small))
    weight = dict(clip.named_parameters())[find_position_table(clip)[0]]  # [1 + 16, 32]
    name, _, _, prefix = find_position_table(clip)
    assert name.endswith("position_embedding.weight") and prefix == 1
    assert torch.allclose(pos_similarity(clip), direct_cosine(weight[1:], (4, 4)), atol=1e-6)


def test_pytorch_pretrained_vit(monkeypatch):
    import pytorch_pretrained_vit as ppv  # dev dependency
    import pytorch_pretrained_vit.model as ppv_model

    # ViT(name=None, ...) reads an undefined global `resize_positional_embedding` in 0.0.7
    monkeypatch.setattr(ppv_model, "resize_positional_embedding", False, raising=False)
    model = ppv.ViT(None, patches=8, dim=32, ff_dim=64, num_heads=2, num_layers=1,
                    image_size=(24, 40), num_classes=3)
    table = model.positional_embedding.pos_embedding  # [1, 1 + 3*5, 32]
    name, _, grid, prefix = find_position_table(model)
    assert (name, grid, prefix) == ("positional_embedding.pos_embedding", (3, 5), 1)
    assert torch.allclose(pos_similarity(model), direct_cosine(table[0, 1:], (3, 5)), atol=1e-6)


class HandWritten(nn.Module):
    """A tiny ViT-like module with its own names."""

    def __init__(self, with_cls: bool, extra_pos: bool = False, shape_2d: bool = False):
        super().__init__()
        self.patchify = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.image_size = 12
        n = 9 + (1 if with_cls else 0)
        if with_cls:
            self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.my_pos_table = nn.Parameter(torch.randn(1, 3, 3, 8) if shape_2d else torch.randn(1, n, 8))
        if extra_pos:
            self.other_pos = nn.Parameter(torch.randn(1, n, 8))
        self.bias_table = nn.Parameter(torch.randn(1, n, 8))  # no "pos" in the name: ignored

    def forward(self, x):
        return self.patchify(x)


@pytest.mark.parametrize("with_cls", [True, False])
def test_hand_written_pos_parameter(with_cls):
    model = HandWritten(with_cls)
    m = vitviz.wrap(model)
    table = model.my_pos_table[0, 1:] if with_cls else model.my_pos_table[0]
    assert torch.allclose(pos_similarity(m), direct_cosine(table, (3, 3)), atol=1e-6)


def test_hand_written_2d_table():
    model = HandWritten(False, shape_2d=True)
    assert torch.allclose(pos_similarity(model), direct_cosine(model.my_pos_table[0].reshape(9, 8), (3, 3)),
                          atol=1e-6)


def test_ambiguous_and_missing_tables_are_errors():
    with pytest.raises(LayoutError, match="several"):
        pos_similarity(HandWritten(True, extra_pos=True))
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3,
                          pos_embed="none")
    with pytest.raises(LayoutError, match="no patch position embeddings"):
        pos_similarity(m)


def test_resample_grid_identity_and_shape():
    e = torch.randn(12, 5)
    assert resample_grid(e, (3, 4), (3, 4)) is e
    assert resample_grid(e, (3, 4), (6, 2)).shape == (12, 5)
    with pytest.raises(LayoutError):
        resample_grid(e, (2, 2), (4, 4))
