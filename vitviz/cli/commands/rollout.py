"""`vitviz rollout`: attention rollout overlay per image."""

from __future__ import annotations

from ._common import (
    add_model_arguments,
    add_naming_argument,
    add_original_argument,
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
    writer_for,
)

NAME = "rollout"
HELP = "attention rollout overlay per image"
DESCRIPTION = ("Attention rollout (Abnar & Zuidema 2020) over each image: writes "
               "<name>_rollout.png (overlay) and <name>_rollout.npy (raw patch map); with "
               "--name-with-model <name>_<model>_rollout.png / .npy. A video model (VideoMAE, ViViT, TimeSformer) "
               "takes video files: <name>_rollout.npy ([frames, gh, gw]), .mp4 and .webp (each frame with the "
               "map of its tubelet) and .png (the frame strip). Prints every file written.")
EXAMPLE = "vitviz rollout cat.jpg dog.png --model b16 --discard-ratio 0.9 --out maps/"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")
    p.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                   help="share of smallest attention entries zeroed per layer, in [0, 1)")
    p.add_argument("--start-layer", type=int, default=0, metavar="L")
    add_render_arguments(p)
    add_original_argument(p)
    add_naming_argument(p)
    add_video_arguments(p)


def run(args) -> int:
    if not 0.0 <= args.discard_ratio < 1.0:
        return fail(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    bad = check_render_arguments(args)
    if bad is not None:
        return bad
    from ...batch import rollout_files, rollout_video_files

    output = output_options(args)
    model = load(args)
    bad = check_video_arguments(args, model)
    if bad is not None:
        return bad
    write, extra = writer_for(model, args, rollout_files, rollout_video_files)
    outcomes = write(model, args.images, args.out, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
                     start_layer=args.start_layer, output=output, tag=model_tag(args), **extra)
    print_notes(output)
    return report(outcomes)
