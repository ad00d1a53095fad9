"""`vitviz gallery`: every map for every image of a folder, and a static page to browse them."""

from __future__ import annotations

import os
import sys

from ._common import add_look_arguments, add_model_arguments, fail, load

NAME = "gallery"
HELP = "maps for a whole folder of images, with a browsable HTML page"
DESCRIPTION = """\
Maps for every image of a folder (recursive), a list file (one path per line) or a glob:
images are decoded in background processes, the model runs in batches, overlays are
rendered while the next batch runs. Writes DIR/index.html (open it in a browser, no server
needed), DIR/<method>/<name>.jpg and .npy, DIR/images/<name>.jpg and DIR/manifest.jsonl.

Re-running the same command resumes where it stopped. Unreadable images are skipped and
listed (exit status 1). To scale past one machine, split the work into N shards, e.g. as a
Slurm array job (#SBATCH --array=1-8):
  vitviz gallery photos/ --model b16 --out g/ --shard $SLURM_ARRAY_TASK_ID/8
The last shard to finish writes the combined page; `vitviz gallery --merge g/` does it by hand."""
EXAMPLE = "vitviz gallery photos/ --model b16 --methods rollout,cls --out gallery/ --batch-size 32"


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="*", metavar="SRC",
                   help="folder, list file (.txt/.lst), glob ('photos/**/*.jpg') or image files")
    add_model_arguments(p, required=False)
    g = p.add_argument_group("gallery")
    g.add_argument("--out", metavar="DIR", help="gallery folder (created; re-running resumes)")
    g.add_argument("--methods", default="rollout,cls", metavar="LIST",
                   help="comma-separated registered map methods (default: rollout,cls; also relevance, "
                        "grad_rollout, flow, random, centre, caption for captioners, text for CLIP models; "
                        "see `vitviz methods`)")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding processes (0: decode in the main process; default min(4, CPUs-1))")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the model (default: torch's own setting)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    g.add_argument("--shard", default=None, metavar="K/N",
                   help="do shard K of N (1 <= K <= N), deterministic by file path")
    g.add_argument("--merge", metavar="DIR", help="combine the shards of DIR into one index and exit")
    g.add_argument("--page-size", type=int, default=100, metavar="N", help="images per HTML page")
    g.add_argument("--explore", action="store_true",
                   help="also write each image's explorer page (explore/<name>.html, as `vitviz explore`), "
                        "linked from its large view")
    g.add_argument("--list-methods", action="store_true", help="list the map methods and exit (as `vitviz methods`)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for --random weights, so shards and resumed runs build the same model")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    o = p.add_argument_group("maps")
    o.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean",
                   help="rollout, grad_rollout, flow")
    o.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                   help="rollout, grad_rollout: share of the smallest attention entries zeroed, in [0, 1)")
    o.add_argument("--start-layer", type=int, default=0, metavar="L", help="rollout, grad_rollout, relevance, flow")
    o.add_argument("--layer", type=int, default=-1, metavar="L", help="cls: the layer shown")
    o.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="caption: longest caption")
    o.add_argument("--texts", nargs="+", default=None, metavar="TEXT",
                   help="text: the texts to locate (CLIP / SigLIP models), one map each")
    o.add_argument("--text-method", choices=["chefer", "legrad", "maskclip"], default="chefer",
                   help="text: how each text's map is made (see `vitviz text`)")
    add_look_arguments(o)
    o.add_argument("--norm", default="image", metavar="RULE",
                   help="colour scale: image (min-max per image, default) or none (raw values on a "
                        "fixed [0, 1] scale, the same in every image)")


def _report_record(rec: dict, write) -> None:
    if rec.get("status") != "done":
        write(f"vitviz: {rec['status']} {rec['source']}: {rec.get('reason')}")


def run(args) -> int:
    from ...gallery import merge_gallery  # the registry (and torch) load only when methods are needed

    if args.list_methods:
        from ...explain import get_method, list_methods

        for name in list_methods():
            m = get_method(name)
            print(f"{name:<12} {m.description}")
        return 0
    if args.merge:
        if args.sources or args.model:
            return fail("--merge DIR combines existing shards: give no SRC and no --model")
        result = merge_gallery(args.merge, page_size=args.page_size)
        for rec in result.records:
            _report_record(rec, lambda s: print(s, file=sys.stderr))
        print(f"gallery: {result.summary()}; page: {result.index}", file=sys.stderr)
        return result.exit_code
    if not args.sources:
        return fail("give a folder, list file or glob (SRC), or --merge DIR")
    if not args.model:
        return fail("--model NAME is required (e.g. --model b16, or --model ti16 --random)")
    if not args.out:
        return fail("--out DIR is required: the gallery folder")
    checks = [(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
              (args.workers is None or args.workers >= 0, f"--workers must be 0 or more, got {args.workers}"),
              (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
              (args.threads is None or args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
              (args.page_size >= 1, f"--page-size must be at least 1, got {args.page_size}"),
              (0.0 <= args.discard_ratio < 1.0, f"--discard-ratio must be in [0, 1), got {args.discard_ratio}"),
              (args.alpha is None or 0.0 <= args.alpha <= 1.0,
               f"--alpha must be in [0, 1] (or left out: opacity that grows with the value), got {args.alpha}"),
              (args.norm in ("image", "none"),
               f"--norm must be image or none for a gallery, got {args.norm!r} (it renders while it "
               "runs, before the run's range is known; none shares one fixed [0, 1] scale)")]
    for ok, message in checks:
        if not ok:
            return fail(message)
    from ...explain import get_method
    from ...gallery import parse_shard

    shard = parse_shard(args.shard)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m).check_installed()  # unknown names and missing extras fail now, before the model loads
    options = {}
    for name in ("rollout", "grad_rollout"):
        if name in methods:
            options[name] = {"head_fusion": args.head_fusion, "discard_ratio": args.discard_ratio,
                             "start_layer": args.start_layer}
    if "relevance" in methods:
        options["relevance"] = {"start_layer": args.start_layer}
    if "flow" in methods:
        options["flow"] = {"head_fusion": args.head_fusion, "start_layer": args.start_layer}
    if "cls" in methods:
        options["cls"] = {"layer": args.layer}
    if "caption" in methods:
        options["caption"] = {"max_new_tokens": args.max_new_tokens}
    if "text" in methods:
        if not args.texts:
            return fail('the text method needs --texts, e.g. --texts "a red circle" "a blue square"')
        options["text"] = {"texts": list(args.texts), "method": args.text_method}

    import signal

    import torch
    from tqdm.auto import tqdm

    from ...gallery import build_gallery

    torch.manual_seed(args.seed)  # --random weights: the same model in every shard and resumed run
    model = load(args)
    weights = os.path.abspath(args.weights) if args.weights else ("random" if args.random else "pretrained")

    def on_term(signum, frame):  # Slurm preemption, `kill`: stop like Ctrl-C, files whole
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = build_gallery(args.sources, model, args.out, methods=methods, options=options,
                               batch_size=args.batch_size, workers=args.workers, limit=args.limit,
                               threads=args.threads,
                               shard=shard, page_size=args.page_size, cmap=args.cmap, alpha=args.alpha,
                               smooth=args.smooth,
                               norm=args.norm,
                               model_id=f"{args.model} ({weights})", progress=not args.no_progress,
                               explore=args.explore,
                               on_record=lambda r: _report_record(
                                   r, lambda s: tqdm.write(s, file=sys.stderr)))
    except KeyboardInterrupt:
        print("gallery: stopped; every file written is whole. Run the same command again to "
              "resume (finished images are skipped).", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    where = f"page: {result.index}" if result.index else (
        f"shard {shard[0]}/{shard[1]} done; the last shard writes the page, or run "
        f"`vitviz gallery --merge {args.out}`")
    print(f"gallery: {result.summary()}; {where}", file=sys.stderr)
    return result.exit_code
