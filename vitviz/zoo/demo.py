"""The offline demo: the bundled models on fresh synthetic scenes, written as a small gallery.

``vitviz demo --out DIR`` (and ``make demo``) calls :func:`write_demo`. Everything runs on
the CPU in seconds: two tiny models, a few 64 px scenes, matplotlib figures, one HTML page.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .._util.files import atomic_write_bytes


def _save_fig(fig, path: Path) -> Path:
    from ..render.figures import save_figure

    return save_figure(fig, path)


def _pos_similarity(model):
    """``[P, gh, gw]`` cosine similarity of the patch position embeddings (vitviz's analyzer if present)."""
    try:
        from ..models import pos_similarity

        return pos_similarity(model)
    except ImportError:
        import torch

        grid = model.layout.grid
        pe = model.module.pos_embed[0, -grid[0] * grid[1]:].detach().float()  # [P, D]
        pe = torch.nn.functional.normalize(pe, dim=-1)
        return (pe @ pe.T).reshape(-1, *grid)  # [P, gh, gw]


def classifier_section(out: Path, num_images: int, seed: int) -> list[tuple[str, str, str]]:
    """Figures of ``shapes-vit``; returns ``(title, file, text)`` per figure."""
    import torch

    from ..analyze import cls_maps, rollout
    from ..evaluate.metrics import pointing_game
    from ..explain import attentions_of, captured
    from ..models import load_model
    from ..models.bundled.shapes import to_input
    from ..render import figures
    from .scenes import make_dataset

    model = load_model("shapes-vit")
    scenes = make_dataset("classification", range(seed, seed + num_images))
    x = to_input(np.stack([s.image for s in scenes]))  # [B, 3, 64, 64]
    logits, rec = captured(model, x)
    probs = logits.softmax(-1)  # [B, C]
    attn = attentions_of(rec, model)  # [L, B, H, N, N]
    roll = rollout(attn)  # [B, gh, gw]
    roll_d = rollout(attn, discard_ratio=0.9)  # [B, gh, gw]
    last = cls_maps(attn, layer=-1)  # [B, H, gh, gw]
    try:
        from ..explain import relevance

        rel = relevance(model, x, method="chefer")  # [B, gh, gw]
    except ImportError:
        rel = None
    masks = torch.from_numpy(np.stack([s.mask for s in scenes]))
    hits = pointing_game(roll, masks)
    entries = []
    panels = [("rollout", roll), ("rollout, discard 0.9", roll_d), ("CLS, last layer", last.mean(1))]
    if rel is not None:
        panels.append(("relevance (Chefer)", rel))
    for i, s in enumerate(scenes):
        pred = int(probs[i].argmax())
        fig, _ = figures.panels(s.image, [(name, maps[i]) for name, maps in panels],
                                image_title=f"truth: {s.label_name}\npredicted: {model.labels[pred]} "
                                            f"({float(probs[i, pred]):.0%})")
        f = _save_fig(fig, out / f"classifier_{i}.png")
        entries.append((f"scene {s.seed}", f.name,
                        f"rollout's maximum {'is' if hits[i] == 1 else 'is not'} on the {s.label_name}"))
    # every head of every layer for the first scene
    all_cls = torch.stack([cls_maps(attn, layer=i)[0] for i in range(attn.num_layers)])  # [L, H, gh, gw]
    nl, nh = all_cls.shape[:2]
    fig, _ = figures.map_grid(all_cls, scenes[0].image, row_labels=[f"layer {i}" for i in range(nl)],
                              col_labels=[f"head {h}" for h in range(nh)],
                              title=f"CLS attention of every head, scene {scenes[0].seed}")
    f = _save_fig(fig, out / "classifier_cls_heads.png")
    entries.append(("CLS attention of every head", f.name,
                    f"scene {scenes[0].seed}: what the CLS token reads in each layer and head"))
    # position-embedding similarity: one small grid per patch, as in the ViT paper's figure
    sim = _pos_similarity(model).detach().float().cpu().numpy()  # [P, gh, gw]
    fig, _ = figures.pos_similarity_grid(sim, title="shapes-vit: position-embedding similarity")
    f = _save_fig(fig, out / "classifier_posembed.png")
    entries.append(("position embeddings", f.name,
                    "cosine similarity of each patch's learned position embedding with all others"))
    return entries


def files_section(out: Path) -> list[tuple[str, str, str]]:
    """``shapes-vit`` on the sample image files, through the same pipeline as `vitviz rollout`."""
    from ..batch import rollout_files
    from ..models import load_model
    from . import sample_images

    model = load_model("shapes-vit")
    outcomes = rollout_files(model, sample_images(), out, discard_ratio=0.9, progress=False)
    entries = []
    for o in outcomes:
        if o.ok:
            png = next(p for p in o.outputs if p.suffix == ".png")
            entries.append((Path(o.source).name, png.name,
                            f"predicted: {o.prediction}; `vitviz rollout {Path(o.source).name} --model "
                            "shapes-vit --discard-ratio 0.9` (the file is squashed to 64x64 px)"))
    return entries


def captioner_section(out: Path, num_images: int, seed: int) -> list[tuple[str, str, str]]:
    """Caption strips of ``shapes-captioner``; returns ``(title, file, text)`` per figure."""
    from ..explain.captioning import caption
    from ..models import load_model
    from ..render import caption_strip
    from .scenes import make_dataset

    model = load_model("shapes-captioner")
    scenes = make_dataset("caption", range(seed, seed + num_images))
    entries = []
    for i, s in enumerate(scenes):
        cap = caption(model, s.image, max_new_tokens=12)
        # the mean over the decoder layers grounds words best (`vitviz benchmark-maps --model
        # shapes-captioner`: 0.99 of colour and shape words peak on their object)
        grids = cap.word_grids(layer=None, head_fusion="mean", merge="mean").mean(0)  # [W, gh, gw]
        fig, _ = caption_strip(cap.image, grids, [w.text for w in cap.words],
                               title=f"generated: {cap.text}\ntruth: {s.caption}")
        f = _save_fig(fig, out / f"caption_{i}.png")
        entries.append((f"scene {s.seed}", f.name, f"generated: “{cap.text}”; truth: “{s.caption}”"))
    return entries


def _inline(text: str) -> str:
    """HTML of a caption: escaped, with `backtick spans` as <code> (the captions name commands)."""
    parts = html.escape(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: keep it as it is
        return html.escape(text)
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _page(sections: list[tuple[str, str, list[tuple[str, str, str]]]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>vitviz demo</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "figure{margin:1em 0}img{max-width:100%}figcaption{color:#444;font-size:90%}</style>",
             "</head><body><h1>vitviz demo</h1>",
             "<p>Bundled models trained on synthetic scenes whose objects are known "
             "(<code>vitviz.zoo</code>); regenerate with <code>vitviz demo</code>.</p>"]
    for title, intro, entries in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{_inline(intro)}</p>")
        for name, file, text in entries:
            parts.append(f"<figure><img src='{html.escape(file)}' alt='{html.escape(name)}'>"
                         f"<figcaption><b>{html.escape(name)}</b>: {_inline(text)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_demo(out_dir, *, num_images: int = 4, seed: int = 3_000_000,
               captioner: bool | None = None) -> Path:
    """Write the demo gallery to ``out_dir``; returns the path of its ``index.html``.

    Args:
        out_dir: output folder (created).
        num_images: scenes per model.
        seed: first scene seed (outside the training range).
        captioner: include the captioner (default: when ``vitviz.explain.captioning`` is available).
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sections = [("shapes-vit: which shape is it?",
                 "A timm ViT (64 px, 8 px patches, 4 blocks) names the shape. Each row: the scene, "
                 "then maps over it: attention rollout, rollout keeping the largest 10% of "
                 "attention, the last layer's CLS attention, and class relevance.",
                 classifier_section(out, num_images, seed))]
    sections.append(("image files",
                     "The sample images shipped in vitviz/assets, read from disk and preprocessed "
                     "like any user image; each file also gets the raw map as .npy.",
                     files_section(out)))
    if captioner is None:
        try:
            import vitviz.explain.captioning  # noqa: F401

            captioner = True
        except ImportError:
            captioner = False
    if captioner:
        sections.append(("shapes-captioner: what does each word look at?",
                         "A ViT encoder + GPT-2 decoder captions the scene; each panel is the "
                         "cross-attention of the decoder query that chose that word (heads and "
                         "decoder layers averaged).",
                         captioner_section(out, num_images, seed + 1000)))
    index = out / "index.html"
    atomic_write_bytes(index, _page(sections).encode("utf-8"))
    return index


__all__ = ["write_demo"]
