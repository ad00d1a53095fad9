"""Figures: real PNG files of sensible size, not blank, different for different maps; ax=
composes; no pyplot state; atomic saving; notebooks' _repr_png_."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitviz import AttentionMaps, TokenLayout
from vitviz.render import figures as F

IMAGE = np.zeros((48, 64, 3), dtype=np.uint8)
IMAGE[:, :32] = (200, 40, 40)
IMAGE[10:30, 40:60] = (40, 40, 200)


def as_array(fig) -> np.ndarray:
    png = F.figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def check(fig, min_w=100, min_h=60) -> np.ndarray:
    arr = as_array(fig)
    h, w = arr.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    assert arr.std() > 10, "blank figure"
    return arr


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    import matplotlib.pyplot as plt

    before = list(plt.get_fignums())
    yield
    assert plt.get_fignums() == before  # figures never go through pyplot


def maps(seed, shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_map_grid_with_and_without_image():
    m = maps(0, (3, 4, 3, 4))  # layers x heads x gh x gw
    fig, ax = F.map_grid(m, IMAGE, row_labels=[f"layer {i}" for i in range(3)],
                         col_labels=[f"head {h}" for h in range(4)])
    a = check(fig, 200, 150)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1", "layer 2"]
    b = check(F.map_grid(maps(1, (3, 4, 3, 4)), IMAGE)[0], 200, 150)
    assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 1  # other maps, other picture
    c = check(F.map_grid(m)[0])  # no image: the coloured maps alone
    assert c.shape[0] > 100
    check(F.map_grid(m[0])[0])  # one row
    with pytest.raises(ValueError, match="rows, cols"):
        F.map_grid(torch.rand(2, 2))


def test_panels_titles_and_content():
    fig, ax = F.panels(IMAGE, {"rollout": maps(2, (3, 4)), "flow": maps(3, (3, 4))})
    arr = check(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image", "rollout", "flow"]
    other = as_array(F.panels(IMAGE, [("rollout", maps(4, (3, 4))), ("flow", maps(5, (3, 4)))])[0])
    assert arr.shape == other.shape and np.abs(arr.astype(int) - other).mean() > 1
    # the first panel is the plain image: red on the left half
    assert arr.shape[1] > 3 * 64


def test_pos_similarity_grid_has_colour_bar():
    e = torch.randn(12, 8)
    e = e / e.norm(dim=-1, keepdim=True)
    sim = (e @ e.T).reshape(12, 3, 4)
    fig, ax = F.pos_similarity_grid(sim)
    check(fig, 200, 150)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "Cosine similarity"
    assert ax.get_xlabel() == "Input patch column"
    with pytest.raises(ValueError):
        F.pos_similarity_grid(torch.rand(5, 3, 4))


def test_distance_entropy_heatmap_and_masks():
    d = torch.rand(6, 4) * 100
    fig, ax = F.distance_plot(d)
    check(fig)
    assert ax.get_xlabel() == "Network depth (layer)" and "pixels" in ax.get_ylabel()
    assert len(ax.collections) == 4  # one scatter per head
    a = check(F.entropy_heatmap(maps(6, (6, 4)))[0])
    b = as_array(F.entropy_heatmap(maps(7, (6, 4)))[0])
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 1
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 1:, 2:] = True
    with_masks = check(F.mask_contours(IMAGE, masks, labels=["head 0", "head 1"])[0])
    without = as_array(F.mask_contours(IMAGE, torch.zeros(3, 4, dtype=torch.bool))[0])
    assert with_masks.shape != without.shape or np.abs(with_masks.astype(int) - without).mean() > 0.5


def test_ax_composes_into_one_figure():
    fig = F.new_figure(900, 400)
    axes = fig.subplots(1, 2)
    f1, a1 = F.map_grid(maps(8, (2, 2, 3, 4)), IMAGE, ax=axes[0])
    f2, a2 = F.distance_plot(torch.rand(2, 2), ax=axes[1])
    assert f1 is fig and f2 is fig and a1 is axes[0] and a2 is axes[1]
    check(fig, 300, 150)


def test_save_figure_is_atomic(tmp_path):
    fig, _ = F.heatmap(maps(9, (3, 3)), label="x")
    out = F.save_figure(fig, tmp_path / "sub" / "heat.png")
    assert out == tmp_path / "sub" / "heat.png"
    assert Image.open(out).format == "PNG"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["heat.png"]  # no temporary files


def test_attention_maps_repr_png():
    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    att = torch.softmax(torch.randn(4, 2, 3, 10, 10, generator=torch.Generator().manual_seed(0)) * 3, -1)
    png = AttentionMaps(att, layout)._repr_png_()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[0] > 150 and img.shape[1] > 150 and img.std() > 10
    other = AttentionMaps(torch.softmax(torch.randn(4, 2, 3, 10, 10) * 3, -1), layout)._repr_png_()
    assert other != png
    # models without a CLS token get the mean of the patch rows
    AttentionMaps(torch.softmax(torch.randn(2, 1, 2, 4, 4), -1), TokenLayout(num_prefix=0, grid=(2, 2)))._repr_png_()


def test_a_one_by_one_grid_is_a_map():
    # LeViT / EfficientViT at small inputs end on a 1x1 grid: a [1, 1] map, not a 0-D value
    from vitviz import render as O

    assert O.as_map(torch.tensor([[0.7]])).shape == (1, 1)
    assert O.as_map(np.ones((1, 1, 1, 1), dtype=np.float32)).shape == (1, 1)
    assert O.as_map(np.ones((1, 3, 4), dtype=np.float32)).shape == (3, 4)
    assert O.as_map(np.ones((3, 4, 1), dtype=np.float32)).shape == (3, 4)
    from vitviz.errors import RenderError

    with pytest.raises(RenderError):
        O.as_map(np.ones((2, 3, 4), dtype=np.float32))  # several maps are not one
    out = O.overlay(IMAGE, torch.tensor([[0.7]]))
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
