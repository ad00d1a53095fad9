"""Draws every figure of the documentation from the bundled models, offline.

``python docs/figures.py OUT_DIR`` writes them into OUT_DIR; the site build calls :func:`draw`
(``docs/hooks.py``) and publishes them under ``figures/``, so no figure in the docs is a
hand-placed file. Each figure is a few lines of the public API on the bundled models
(``shapes-vit``, ``shapes-captioner``, ``shapes-clip``) and the sample images in
``vitviz/assets/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "vitviz" / "assets"
TRIANGLE = ASSETS / "shapes-triangle.png"
TWO_SHAPES = ASSETS / "shapes-circle-square.png"


def draw(out: Path) -> list[Path]:
    """Draw every figure into ``out``; returns the files written, in a stable order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import vitviz
    from vitviz.evaluate import sanity_check
    from vitviz.render import map_grid, panels, pos_similarity_grid, save_figure
    from vitviz.render.sanity_figures import curves_figure, randomization_grid

    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, out / name))
        plt.close(fig)

    # the classifier: rollout, CLS attention of the last layer, relevance of the predicted class
    m = vitviz.load_model("shapes-vit")
    for image, name in ((TRIANGLE, "maps_triangle.png"), (TWO_SHAPES, "maps_circle_square.png")):
        x = m.preprocess(image)
        with vitviz.capture(m) as rec:
            m(x)
        maps = {"rollout": vitviz.rollout(rec.attentions)[0],
                "CLS, last layer": vitviz.cls_maps(rec.attentions, layer=-1)[0].mean(0),
                "relevance (Chefer)": vitviz.relevance(m, x)[0]}
        fig, _ = panels(m.preprocessor.view(image), maps)
        save(fig, name)

    # the default overlay against the classic one (issue 30), on the demo's classifier scene 1 (seed
    # 3_000_001), where jet at 0.5 drew the peak on the blue triangle as a dark hole
    from vitviz.zoo.scenes import make_dataset

    scene = make_dataset("classification", [3_000_001])[0]
    x = m.preprocess(scene.image)
    with torch.no_grad(), vitviz.capture(m) as rec:
        logits = m(x)
    maps = {"rollout": vitviz.rollout(rec.attentions)[0],
            "rollout, discard 0.9": vitviz.rollout(rec.attentions, discard_ratio=0.9)[0],
            "CLS, last layer": vitviz.cls_maps(rec.attentions, layer=-1)[0].mean(0),
            "relevance (Chefer)": vitviz.relevance(m, x)[0]}
    p = logits.softmax(-1)[0]
    k = int(p.argmax())
    title = f"truth: {scene.label_name}\npredicted: {m.labels[k]} ({float(p[k]):.0%})"
    for name, look in (("overlay_before.png", {"cmap": "jet", "alpha": 0.5, "smooth": True}),
                       ("overlay_after.png", {})):
        fig, _ = panels(scene.image, maps, image_title=title, **look)
        save(fig, name)

    # every head of every layer: what the CLS token looks at
    x = m.preprocess(TRIANGLE)
    with vitviz.capture(m) as rec:
        m(x)
    cls = torch.stack([vitviz.cls_maps(rec.attentions, layer=layer)[0]
                       for layer in range(rec.attentions.tensor.shape[0])])  # [L, H, gh, gw]
    fig, _ = map_grid(cls, m.preprocessor.view(TRIANGLE),
                      row_labels=[f"layer {i}" for i in range(cls.shape[0])],
                      col_labels=[f"head {j}" for j in range(cls.shape[1])])
    save(fig, "cls_heads.png")

    fig, _ = pos_similarity_grid(vitviz.pos_similarity(m))
    save(fig, "posembed.png")

    # sanity checks: two methods, both sample images, ROAD on the first
    images = [m.preprocess(p)[0] for p in (TWO_SHAPES, TRIANGLE)]
    report = sanity_check(m, torch.stack(images), ("rollout", "relevance"), road_images=1, steps=8,
                          road_steps=5)
    fig, _ = randomization_grid(report.randomization, m.preprocessor.view(TWO_SHAPES), index=0)
    save(fig, "sanity_randomization.png")
    fig, _ = curves_figure(report)
    save(fig, "sanity_curves.png")

    # the captioner: one map per generated word
    c = vitviz.load_model("shapes-captioner")
    cap = vitviz.caption(c, TWO_SHAPES)
    fig, _ = cap.figure()
    save(fig, "caption_strip.png")

    # the CLIP model: where each text matches
    clip = vitviz.load_model("shapes-clip")
    texts = ["a red circle", "a blue square"]
    maps = vitviz.explain_text(clip, TWO_SHAPES, texts)  # [T, gh, gw]
    fig, _ = panels(clip.preprocessor.view(TWO_SHAPES), dict(zip(texts, maps)))
    save(fig, "text_maps.png")

    # the explorer page of one image (a self-contained HTML file)
    written.append(vitviz.explore(m, TRIANGLE).save(out / "explore_triangle.html"))
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/figures.py OUT_DIR")
    for path in draw(Path(sys.argv[1])):
        print(path)
