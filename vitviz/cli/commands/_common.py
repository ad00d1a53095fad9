"""Pieces shared by the commands: model arguments, loading, outcome reports, errors."""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --weights, --random, --num-classes, --image-size, --device."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, metavar="NAME",
                   help="alias (b16, s16, deit-s-distilled, dinov2-s-reg, ...), timm name, "
                        "transformers id or local directory")
    g.add_argument("--weights", metavar="FILE",
                   help=".safetensors or .pth/.pt/.bin state dict (also pytorch_pretrained_vit checkpoints)")
    g.add_argument("--random", action="store_true", help="untrained weights (no download needed)")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size (default: from --weights)")
    g.add_argument("--image-size", type=int, metavar="PX",
                   help="input size; position embeddings are interpolated when needed")
    g.add_argument("--device", default=None, metavar="DEV",
                   help="cpu, cuda or mps (default: cuda when available)")


def add_look_arguments(p) -> None:
    """--cmap, --alpha and --smooth: how a map is drawn over the image (every command that draws
    overlays; ``p`` is a parser or an argument group)."""
    p.add_argument("--cmap", default="inferno", metavar="NAME",
                   help="colour map (default inferno, perceptually uniform; jet, viridis, magma, ...)")
    p.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="a constant weight of the colour in [0, 1] (e.g. --cmap jet --alpha 0.5 --smooth: the "
                        "classic look); default: opacity that grows with the value, so low attention leaves "
                        "the image as it is")
    p.add_argument("--smooth", action="store_true",
                   help="interpolate the map bicubically (default: each patch drawn as a block)")


def check_alpha_argument(args):
    """The exit status for a bad --alpha (after printing the error), or None."""
    alpha = getattr(args, "alpha", None)
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        return fail(f"--alpha must be in [0, 1] (or left out: opacity that grows with the value), got {alpha}")
    return None


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """--batch-size, --cmap, --alpha, --smooth, --out and the output options of the commands that
    write overlays."""
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    add_look_arguments(p)
    p.add_argument("--out", default="vitviz-out", metavar="DIR")
    add_output_arguments(p)


def add_output_arguments(p: argparse.ArgumentParser, maps: bool = True) -> None:
    """--format, --dpi and, for commands that draw maps, --size, --norm, --colorbar, --bare."""
    g = p.add_argument_group("output")
    g.add_argument("--format", default="png", metavar="FMT",
                   help="figures as png, jpg, pdf or svg (default png); overlays stay raster "
                        "(jpg with --format jpg, else png)")
    g.add_argument("--dpi", type=int, default=100, metavar="N",
                   help="resolution of figures, 50..600 (default 100); panels are at least 2.5 in")
    if maps:
        g.add_argument("--size", type=int, default=None, metavar="PX",
                       help="short side of overlays in pixels (default: the model's input size, "
                            "enlarged to at least 256: by a whole factor up to 128 px, e.g. 64 -> 256)")
        g.add_argument("--norm", default="image", metavar="RULE",
                       help="colour scale: image (min-max per image, default), batch (one scale "
                            "shared by all images of the run), none (raw values on [0, 1])")
        g.add_argument("--colorbar", action="store_true", default=True,
                       help="a colour bar that states the scale on overlays and figures (the default; "
                            "accepted for older scripts)")
        g.add_argument("--bare", action="store_true",
                       help="write single overlays as the plain overlay pixels (no title, no colour bar), "
                            "for reuse in other figures; figures of several maps lose their colour bar")


def add_class_argument(p: argparse.ArgumentParser, what: str = "class to explain") -> None:
    """--class K or NAME (an index, or a class name for models that have them)."""
    p.add_argument("--class", dest="target", default=None, metavar="K|NAME",
                   help=f"{what}: an index, or a class name for models with names (list them with "
                        "`vitviz classes MODEL`); default: each image's predicted class")


def check_class_argument(args):
    """The exit status for a negative --class index (after printing the error), or None; names are
    checked once the model is loaded (:func:`class_target`)."""
    t = getattr(args, "target", None)
    if t is not None and str(t).strip().lstrip("-").isdigit() and int(t) < 0:
        return fail(f"--class must be a class index >= 0 or a class name, got {t}")
    return None


def class_target(model, args):
    """The class index --class names for ``model`` (None: the predicted class); an unknown name
    raises a VitvizError listing the close ones."""
    from ...models import class_index

    t = getattr(args, "target", None)
    return None if t is None else class_index(model, t)


def add_original_argument(p: argparse.ArgumentParser) -> None:
    """--on-original of the commands that write one overlay per image."""
    p.add_argument("--on-original", action="store_true",
                   help="draw the overlay on the image at its own resolution (the model's centre-crop "
                        "region mapped back onto it) instead of on the model's input view; each map on "
                        "its own scale (the colour bar states it); not with --size")


def writer_for(model, args, images, clips):
    """``(write, extra)``: a command's image writer or, for a video model, its clip writer, with the
    arguments only that one takes (clips: one per forward pass, four files each)."""
    if model.is_video:
        return clips, dict(stride=args.frame_stride, animation=args.animation)
    return images, dict(batch_size=args.batch_size, on_original=args.on_original)


def check_render_arguments(args):
    """The exit status for bad overlay arguments (after printing the error), or None."""
    bad = check_alpha_argument(args)
    if bad is not None:
        return bad
    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if getattr(args, "on_original", False) and getattr(args, "size", None) is not None:
        return fail("--size does not apply to --on-original overlays, which keep the photo's own size; "
                    "drop one of them")
    return check_output_arguments(args)


def check_output_arguments(args):
    """The exit status for bad --format / --dpi / --size / --norm (after printing), or None."""
    from ...render import NORMS, SIZE_RANGE
    from ...render.figures import DPI_RANGE, FORMATS

    fmt = str(args.format).lower().lstrip(".")
    if fmt not in FORMATS and fmt != "jpeg":
        return fail(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if not DPI_RANGE[0] <= args.dpi <= DPI_RANGE[1]:
        return fail(f"--dpi must be in {DPI_RANGE[0]}..{DPI_RANGE[1]}, got {args.dpi}")
    size = getattr(args, "size", None)
    if size is not None and not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        return fail(f"--size must be in {SIZE_RANGE[0]}..{SIZE_RANGE[1]} pixels, got {size}")
    norm = getattr(args, "norm", "image")
    if norm not in NORMS:
        return fail(f"--norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return None


def output_options(args):
    """The :class:`vitviz.render.OutputOptions` the arguments describe."""
    from ...render.output import OutputOptions

    bare = getattr(args, "bare", False)
    return OutputOptions(format=args.format, dpi=args.dpi, size=getattr(args, "size", None),
                         norm=getattr(args, "norm", "image"), colorbar=getattr(args, "colorbar", True) and not bare,
                         bare=bare, cmap=getattr(args, "cmap", "inferno"), alpha=getattr(args, "alpha", None),
                         smooth=getattr(args, "smooth", False))


NAME_WITH_MODEL_HELP = (
    "put the model in every file name: <name>_<model>_<what> instead of <name>_<what> (with --weights "
    "<model>-<weights file name>, with --random <model>-random), so that runs of several models can "
    "write to one --out; without it, a run overwrites the files of an earlier run of the same images "
    "in that folder, whatever its model")


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """--frame-stride and --animation of the commands that take video files (video models)."""
    g = p.add_argument_group("video (VideoMAE, ViViT, TimeSformer models)",
                             "video files, each sampled to the model's clip length and run as one clip "
                             "(--batch-size applies to images)")
    g.add_argument("--frame-stride", type=int, default=None, metavar="S",
                   help="take the model's frames S apart from the middle of each video (default: spread "
                        "evenly over the whole video, as transformers' video processors sample)")
    g.add_argument("--animation", choices=["webp", "gif"], default="webp",
                   help="the looping animation written next to the MP4 (default webp, lossless)")


def check_video_arguments(args, model):
    """The exit status for video options that do not fit ``model`` (after printing), or None."""
    stride = getattr(args, "frame_stride", None)
    if stride is not None and stride < 1:
        return fail(f"--frame-stride must be at least 1, got {stride}")
    if not getattr(model, "is_video", False):
        if stride is not None:
            return fail(f"--frame-stride applies to video models; {model.name} takes still images")
        return None
    if getattr(args, "on_original", False):
        return fail("--on-original applies to images; video overlays are drawn on the frames as the model saw them")
    return None


def add_naming_argument(p: argparse.ArgumentParser) -> None:
    """--name-with-model of the commands that write files named after each image."""
    p.add_argument("--name-with-model", action="store_true", help=NAME_WITH_MODEL_HELP)


def model_tag(args) -> str | None:
    """The model's part of the file names with ``--name-with-model`` (None without it):
    the model name made file-safe (``org/name`` -> ``org--name``, a local folder -> its name),
    then ``-<weights file stem>`` or ``-random``."""
    if not getattr(args, "name_with_model", False):
        return None
    import os
    import re
    from pathlib import Path

    name = str(args.model)
    if os.path.isdir(name):
        name = Path(name).resolve().name
    tag = name.replace("/", "--")
    if getattr(args, "weights", None):
        tag += f"-{Path(args.weights).stem}"
    elif getattr(args, "random", False):
        tag += "-random"
    tag = re.sub(r"[^\w.\-]+", "_", tag).strip("._") or "model"
    return tag[:100]


def with_model(stem: str, tag: str | None) -> str:
    """``<name>_<model>`` with ``--name-with-model``, else the image's stem as it is."""
    return f"{stem}_{tag}" if tag else stem


def print_notes(output) -> None:
    """The notes collected while rendering (constant maps, a batch of one), one line each."""
    for n in output.notes:
        print(f"vitviz: note: {n}", file=sys.stderr)


def load(args):
    """The model the common arguments describe."""
    from ...models import load_model

    return load_model(args.model, weights=args.weights, pretrained=not args.random,
                      num_classes=args.num_classes, image_size=args.image_size, device=args.device)


def fail(message: str, code: int = 2) -> int:
    """Print one error line and return the exit status."""
    print(f"vitviz: error: {message}", file=sys.stderr)
    return code


def report(outcomes) -> int:
    """Print every file written and what was skipped; 1 when anything was skipped, else 0.

    One line per file, ``IMAGE -> PATH``; the last file of an image (its figure or overlay)
    carries the prediction: ``IMAGE -> PATH  [prediction]``.
    """
    done = [o for o in outcomes if o.ok]
    skipped = [o for o in outcomes if not o.ok]
    for o in done:
        pred = f"  [{o.prediction}]" if o.prediction else ""
        for i, path in enumerate(o.outputs):
            print(f"{o.source} -> {path}{pred if i == len(o.outputs) - 1 else ''}")
    for o in skipped:
        print(f"vitviz: skipped {o.source}: {o.error}", file=sys.stderr)
    print(f"{len(done)} done, {len(skipped)} skipped", file=sys.stderr)
    return 1 if skipped else 0
