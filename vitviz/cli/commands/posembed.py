"""`vitviz posembed`: the position-embedding similarity figure of a model."""

from __future__ import annotations

from ._common import add_model_arguments, add_output_arguments, check_output_arguments, fail, load, output_options

NAME = "posembed"
HELP = "position-embedding similarity figure (one small grid per patch, as in the ViT paper)"
DESCRIPTION = ("Cosine similarity of every patch's learned position embedding with all others: "
               "writes <model>_posembed.png (grid of grids with a colour bar) and "
               "<model>_posembed.npy ([gh*gw, gh, gw]).")
EXAMPLE = "vitviz posembed --model b16 --out figures/"


def _grid(text: str):
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) == 1:
        parts = parts * 2
    try:
        gh, gw = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--grid is ROWSxCOLS (e.g. 24x24) or one number, got {text!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"--grid needs positive sizes, got {text!r}")
    return gh, gw


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--grid", default=None, metavar="GHxGW",
                   help="interpolate the embeddings to this patch grid first (bicubic, as for "
                        "another image size); default: the model's own grid")
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--out", default="vitviz-out", metavar="DIR")
    add_output_arguments(p, maps=False)


def run(args) -> int:
    try:
        grid = _grid(args.grid) if args.grid else None
    except ValueError as e:
        return fail(str(e))
    bad = check_output_arguments(args)
    if bad is not None:
        return bad
    from pathlib import Path

    from ..._util.files import safe_stem, save_npy
    from ...models import pos_similarity
    from ...render.figures import pos_similarity_grid

    output = output_options(args)
    model = load(args)
    sim = pos_similarity(model, grid=grid)  # [P, gh, gw]
    stem = safe_stem(args.model)
    out = Path(args.out)
    gh, gw = sim.shape[-2:]
    npy = save_npy(out / f"{stem}_posembed.npy", sim.cpu().numpy())
    fig, _ = pos_similarity_grid(sim, cmap=args.cmap,
                                 title=f"Position embedding similarity: {args.model} ({gh}x{gw} patches)",
                                 dpi=output.dpi)
    png = output.save_figure(fig, out / f"{stem}_posembed")
    print(f"{args.model} -> {png}")
    print(f"{args.model} -> {npy}")
    return 0
