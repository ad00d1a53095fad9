"""`vitviz cls`: per-head CLS maps of every layer as a grid over each image (and DINO masks)."""

from __future__ import annotations

from ._common import (
    add_model_arguments,
    add_naming_argument,
    add_render_arguments,
    add_video_arguments,
    check_render_arguments,
    check_video_arguments,
    fail,
    load,
    model_tag,
    output_options,
    print_notes,
    report,
    with_model,
)

NAME = "cls"
HELP = "per-head CLS attention maps of every layer, as a grid over each image"
DESCRIPTION = ("What the CLS token (or another query) attends to, per layer and head: writes "
               "<name>_cls.png (layers x heads grid over the image) and <name>_cls.npy "
               "([layers, heads, gh, gw] raw maps). --mask T adds <name>_mask.png: per head, the "
               "smallest set of patches holding a fraction T of the attention (DINO). Hierarchical "
               "models (Swin, PiT, PVT, ...) get one figure and one .npy per stage of token grids: "
               "<name>_stage<k>_cls.png / .npy. --name-with-model puts the model after <name>. "
               "A video model (VideoMAE, ViViT, TimeSformer) takes video files and one layer (--layer, default the "
               "last): <name>_cls.npy ([heads, frames, gh, gw]), <name>_cls.png (a row per head, a column per "
               "temporal position) and <name>_cls.mp4 / .webp (the mean of the heads over every frame). "
               "Prints every file written.")
EXAMPLE = "vitviz cls cat.jpg --model dino-s16 --layer -1 --mask 0.6 --out maps/"

QUERY_HELP = ("query row: cls, dist (distillation token), cls+dist, patches (mean of the patch rows), "
              "prefix, auto (cls, else patches), ROW,COL of a patch (FRAME,ROW,COL for a video model, FRAME "
              "the temporal position), or a token index (default: auto)")


def parse_query(text: str):
    """``"cls"`` / ``"3,7"`` (a patch) / ``"1,3,7"`` (a patch of a clip's temporal position 1) /
    ``"5"`` (a token index) -> a query for the analyzers."""
    t = text.strip().lower()
    if "," in t:
        try:
            where = tuple(int(p) for p in t.split(","))
        except ValueError:
            where = ()
        if len(where) not in (2, 3):
            raise ValueError(f"a patch query is ROW,COL (two integers), or FRAME,ROW,COL for a video model, "
                             f"got {text!r}")
        return where
    if t.lstrip("-").isdigit():
        return int(t)
    return t


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, default=None, metavar="L",
                   help="only this layer (negative counts from the end; default: every layer)")
    p.add_argument("--query", default="auto", metavar="Q", help=QUERY_HELP)
    p.add_argument("--mask", type=float, default=None, metavar="T",
                   help="also draw per-head attention-mass masks keeping a fraction T, e.g. 0.6 "
                        "(of --layer, default the last layer)")
    add_render_arguments(p)
    add_naming_argument(p)
    add_video_arguments(p)


def run(args) -> int:
    bad = check_render_arguments(args)
    if bad is not None:
        return bad
    if args.mask is not None and not 0.0 < args.mask <= 1.0:
        return fail(f"--mask must be in (0, 1], got {args.mask}")
    try:
        query = parse_query(args.query)
    except ValueError as e:
        return fail(str(e))
    from pathlib import Path

    import torch

    from ..._util.files import save_npy
    from ...analyze import check_layer
    from ...analyze.cls import all_layer_maps
    from ...analyze.masks import mass_masks
    from ...attention import count_layers
    from ...batch import iter_captures
    from ...render import display_image
    from ...render.figures import map_grid, mask_contours

    output = output_options(args)
    model = load(args)
    bad = check_video_arguments(args, model)
    if bad is not None:
        return bad
    if model.is_video:
        if args.mask is not None:
            return fail("--mask applies to images; leave it out for a video model")
        from ...batch import cls_video_files

        outcomes = cls_video_files(model, args.images, args.out, layer=-1 if args.layer is None else args.layer,
                                   query=query, stride=args.frame_stride, animation=args.animation,
                                   output=output, tag=model_tag(args))
        print_notes(output)
        return report(outcomes)
    chosen = None
    if args.layer is not None:  # keep only that layer (memory of one layer, not of all L)
        try:
            depth = count_layers(model.module)  # None: known only when the model runs
            chosen = check_layer(depth, args.layer) if depth else args.layer
        except ValueError as e:
            return fail(f"--layer: {e}")
    out = Path(args.out)
    tag = model_tag(args)
    outcomes, waiting = [], []  # waiting: (outcome, stem, view, maps, layers, what) for --norm batch

    def render(o, stem, view, maps, layers, what, scales):
        fig, _ = map_grid(maps, view, row_labels=[f"layer {i}" for i in layers],
                          col_labels=[f"head {h}" for h in range(maps.shape[1])], cmap=output.cmap,
                          alpha=output.alpha, smooth=output.smooth, title=f"{what} attention: {Path(o.source).name}",
                          norm=output.norm, vmin=[s.vmin for s in scales], vmax=[s.vmax for s in scales],
                          colorbar=output.colorbar, label=f"{what} attention", dpi=output.dpi)
        o.outputs.append(output.save_figure(fig, out / f"{stem}_cls"))

    # one figure per stage of token grids (hierarchical models: Swin, PiT, PVT, ...); one for a plain ViT
    for o, stem, view, stages in iter_captures(model, args.images, batch_size=args.batch_size, desc="cls",
                                               keep="all" if chosen is None else [chosen], stages=True):
        outcomes.append(o)
        if o.error:
            continue
        stem = with_model(stem, tag)
        for k, attn in enumerate(stages):
            name = stem if len(stages) == 1 else f"{stem}_stage{k}"
            maps = all_layer_maps(attn, query=query)[:, 0].cpu().numpy()  # [L', H, gh, gw] (L' = 1 with --layer)
            layers = list(attn.layers) if attn.layers is not None else list(range(attn.num_layers))
            what = "CLS" if query in ("auto", "cls") and attn.layout.has_cls else (
                "mean patch" if query == "auto" else f"query {args.query}")
            if len(stages) > 1:
                gh, gw = attn.keys.grid
                what = f"{what} ({gh}x{gw} tokens)"
            o.outputs.append(save_npy(out / f"{name}_cls.npy", maps))
            if args.mask is not None and k == len(stages) - 1:  # the last layer's masks
                masks = mass_masks(torch.from_numpy(maps[-1]), args.mask)  # [H, gh, gw]
                mfig, _ = mask_contours(display_image(view, output.size), masks,
                                        labels=[f"head {h}" for h in range(masks.shape[0])],
                                        title=f"{args.mask:.0%} of the attention mass, layer {layers[-1]}",
                                        dpi=output.dpi)
                o.outputs.append(output.save_figure(mfig, out / f"{stem}_mask"))
            if output.norm == "batch":
                waiting.append((o, name, view, maps, layers, what))
            else:
                render(o, name, view, maps, layers, what, output.scales(list(maps.reshape(-1, *maps.shape[2:]))))
    if waiting:
        every = [m for w in waiting for m in w[3].reshape(-1, *w[3].shape[2:])]  # all maps of the run
        scale = output.scales(every)[0]
        for w in waiting:
            render(*w, [scale] * (w[3].shape[0] * w[3].shape[1]))
    print_notes(output)
    return report(outcomes)
