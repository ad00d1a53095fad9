"""`vitviz relevance`: class-specific relevance overlay per image (Chefer et al. 2021 / grad rollout / LRP)."""

from __future__ import annotations

from ._common import (
    add_class_argument,
    add_model_arguments,
    add_naming_argument,
    add_original_argument,
    add_render_arguments,
    add_video_arguments,
    check_class_argument,
    check_render_arguments,
    check_video_arguments,
    class_target,
    fail,
    load,
    model_tag,
    output_options,
    print_notes,
    report,
    writer_for,
)

NAME = "relevance"
HELP = "class-specific relevance overlay per image (gradient-weighted attention)"
DESCRIPTION = ("Gradient-weighted, class-specific relevance over each image, from one forward and "
               "one backward pass: Chefer et al. 2021 'Generic Attention-model Explainability' "
               "(--method chefer, the default), gradient rollout (--method grad_rollout), or "
               "layer-wise relevance propagation with AttnLRP's rules (--method attnlrp, Achtibat et al. "
               "2024) or CP-LRP's (--method cp-lrp, Ali et al. 2022), summed per patch. "
               "The explained class is each image's predicted class, or --class K. Writes "
               "<name>_relevance.png / .npy (chefer) or <name>_<method>.png / .npy; with "
               "--name-with-model <name>_<model>_relevance.png / .npy. A video classifier (VideoMAE, ViViT, "
               "TimeSformer) takes video files: <name>_relevance.npy ([frames, gh, gw]), .mp4, .webp and .png "
               "(the frame strip). Prints every file written.")
EXAMPLE = "vitviz relevance cat.jpg dog.png --model b16 --class 281 --out maps/"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    add_class_argument(p)
    p.add_argument("--method", choices=["chefer", "grad_rollout", "attnlrp", "cp-lrp"], default="chefer")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean",
                   help="grad_rollout only: how heads of A*grad(A) are fused")
    p.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                   help="grad_rollout only: share of smallest entries zeroed per layer, in [0, 1)")
    p.add_argument("--start-layer", type=int, default=0, metavar="L")
    p.add_argument("--gamma", type=float, default=None, metavar="G",
                   help="attnlrp / cp-lrp only: the gamma rule on linear and convolution layers "
                        "(default: the plain gradient)")
    add_render_arguments(p)
    add_original_argument(p)
    add_naming_argument(p)
    add_video_arguments(p)


def run(args) -> int:
    if not 0.0 <= args.discard_ratio < 1.0:
        return fail(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if args.method == "chefer" and (args.discard_ratio != 0.0 or args.head_fusion != "mean"):
        return fail("--head-fusion and --discard-ratio apply to --method grad_rollout; "
                    "chefer averages the clamped heads")
    if args.method in ("attnlrp", "cp-lrp") and (args.discard_ratio != 0.0 or args.head_fusion != "mean"
                                                or args.start_layer != 0):
        return fail(f"--head-fusion, --discard-ratio and --start-layer do not apply to --method {args.method} "
                    "(LRP propagates through every layer)")
    if args.gamma is not None and args.method not in ("attnlrp", "cp-lrp"):
        return fail(f"--gamma applies to --method attnlrp or cp-lrp, not {args.method}")
    if args.gamma is not None and not args.gamma >= 0.0:
        return fail(f"--gamma must be >= 0, got {args.gamma}")
    bad = check_render_arguments(args)
    if bad is not None:
        return bad
    bad = check_class_argument(args)
    if bad is not None:
        return bad
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    from ...batch import relevance_files, relevance_video_files

    output = output_options(args)
    model = load(args)
    bad = check_video_arguments(args, model)
    if bad is not None:
        return bad
    write, extra = writer_for(model, args, relevance_files, relevance_video_files)
    outcomes = write(model, args.images, args.out, method=args.method, target=class_target(model, args),
                     head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, start_layer=args.start_layer,
                     gamma=args.gamma, output=output, tag=model_tag(args), **extra)
    print_notes(output)
    return report(outcomes)
