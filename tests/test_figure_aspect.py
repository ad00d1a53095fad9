"""Grids wrap to a near-square layout (issue 30): no figure wider than 3x its height, except a
single row of at most 6 panels; labels still never overlap.

map_grid directly with 24 maps (one row of heads, two layers x 24 heads, ...), and every figure
the commands write for a tiny random timm model with 24 heads, opened as written.
"""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from _figcheck import overlapping_labels, panel_sizes, texts_inside_figure
from PIL import Image

from vitviz.cli import main
from vitviz.render import figures as F
from vitviz.render import output as output_module

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def png_size(fig, dpi=F.DPI):
    return Image.open(io.BytesIO(F.figure_bytes(fig, "png", dpi=dpi))).size


@pytest.mark.parametrize("rows, cols", [(1, 24), (2, 24), (3, 13), (1, 8), (2, 12), (12, 12)])
def test_map_grid_wraps_to_near_square(rows, cols):
    maps = torch.rand(rows, cols, 4, 4, generator=torch.Generator().manual_seed(rows * 100 + cols))
    fig, _ = F.map_grid(maps, IMAGE, row_labels=[f"layer {i}" for i in range(rows)],
                        col_labels=[f"head {h}" for h in range(cols)], title="CLS attention of every head",
                        colorbar=True)
    w, h = png_size(fig)
    assert w <= 3 * h, (rows, cols, w, h)
    assert overlapping_labels(fig) == [] and texts_inside_figure(fig) == []
    sizes = panel_sizes(fig)
    assert all(max(sw, sh) >= 0.98 * F.PANEL_IN * F.DPI for sw, sh in sizes)
    # the bands: each rows x per tiles, per = ceil(cols / bands); only the last band has blank tiles
    gids = [im.get_gid() for ax in fig.axes for im in ax.images if (im.get_gid() or "").startswith("vitviz-mosaic")]
    bands = len(gids)
    per = -(-cols // bands)
    assert set(gids) == {f"vitviz-mosaic-{rows}x{per}"}
    assert 0 <= bands * per - cols < per
    # every head label is drawn exactly once
    texts = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() if t.get_text()]
    assert sorted(texts) == sorted(f"head {c}" for c in range(cols))


def test_one_row_of_24_was_the_old_figure():
    """The check can fail: the same 24 maps drawn into one axes (no wrapping) are > 3x wider than high."""
    fig = F.new_figure(100, 100)
    ax = fig.add_subplot(1, 1, 1)
    maps = torch.rand(1, 24, 4, 4)
    F.map_grid(maps, IMAGE, col_labels=[f"head {h}" for h in range(24)], ax=ax)
    fig.set_size_inches(24 * 2.6, 3.0)
    w, h = png_size(fig)
    assert w > 3 * h


def test_a_strip_of_six_stays_one_row():
    fig, _ = F.map_grid(torch.rand(1, 6, 4, 4), IMAGE, col_labels=[f"head {h}" for h in range(6)])
    assert len([ax for ax in fig.axes if ax.images]) == 1  # one band: a strip


def tiny_24_heads():
    import timm

    import vitviz

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                               num_heads=24, num_classes=3)
    return vitviz.wrap(module)


def test_every_figure_the_cli_writes_for_24_heads(tmp_path, monkeypatch, capsys):
    from vitviz.cli.commands import cls, flow, heads, rollout

    for mod in (cls, heads, flow):
        monkeypatch.setattr(mod, "load", lambda args: tiny_24_heads())
    monkeypatch.setattr(rollout, "load", lambda args: tiny_24_heads())
    seen = []
    original = output_module.save_figure

    def spy(fig, path, *, dpi=F.DPI, format=None):
        seen.append((Path(path).stem, fig))
        return original(fig, path, dpi=dpi, format=format)

    monkeypatch.setattr(output_module, "save_figure", spy)
    a = str(SAMPLES[0])
    model = ["--model", "tiny24", "--random"]
    for args in (["cls", a, *model, "--mask", "0.6"], ["cls", a, *model, "--layer", "-1"], ["heads", a, *model],
                 ["flow", a, *model], ["rollout", a, *model]):
        out = tmp_path / args[0] / str(len(args))
        assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(seen) >= 6
    for stem, fig in seen:
        assert overlapping_labels(fig) == [], stem
    for p in tmp_path.rglob("*.png"):
        w, h = Image.open(p).size
        strip = p.stem.endswith("_flow_panels")  # image | rollout | flow: a strip of 3
        assert w <= 3 * h or strip, (p.name, w, h)
