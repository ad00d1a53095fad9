"""`vitviz benchmark-maps`: how well each analysis points at the object, on held-out scenes."""

from __future__ import annotations

import sys

from ._common import fail

NAME = "benchmark-maps"
HELP = "score every attention map against ground-truth masks (bundled models)"
DESCRIPTION = (
    "Scores every registered map method with one map per image (rollout variants, CLS maps per "
    "layer, relevance, gradient rollout, attention flow, your own: see `vitviz methods`) "
    "and two baselines (random map, centre prior) on a fixed set of held-out scenes whose "
    "object masks are known: pointing game, share of the map's mass in the mask, IoU, mask "
    "AUC, and deletion / insertion AUC (RISE). With --model shapes-captioner: word grounding "
    "of the cross-attention maps of colour and shape words. With --model shapes-clip: the pointing "
    "game of each text-map method (vitviz text) for the phrase of each object.")
EXAMPLE = "vitviz benchmark-maps --model shapes-vit --num-images 200"

MODELS = ("shapes-vit", "shapes-captioner", "shapes-clip")


def add_arguments(p) -> None:
    p.add_argument("--model", default="shapes-vit", choices=MODELS,
                   help="a bundled model (the scenes with ground truth are made for them)")
    p.add_argument("--weights", metavar="FILE", help="other weights for the same architecture")
    p.add_argument("--num-images", type=int, default=200, metavar="N",
                   help="held-out scenes to score (seeds 1000000 ..; default 200)")
    p.add_argument("--batch-size", type=int, default=50, metavar="N")
    p.add_argument("--steps", type=int, default=16, metavar="S",
                   help="points of the deletion / insertion curves minus one (default 16)")
    p.add_argument("--no-deletion", action="store_true", help="skip deletion / insertion (faster)")
    p.add_argument("--no-flow", action="store_true",
                   help="skip attention flow (one max-flow problem per patch: the slowest row)")
    p.add_argument("--no-relevance", action="store_true", help="skip relevance and gradient rollout")
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="shapes-vit: only these comma-separated registered map methods (their standard rows, "
                        "e.g. every rollout variant for rollout; see `vitviz methods`); default: every "
                        "registered method with one map per image")
    p.add_argument("--sanity", action="store_true",
                   help="shapes-vit: instead, the sanity checks (model randomisation, token deletion / "
                        "insertion, ROAD) of every method; see `vitviz sanity`")
    p.add_argument("--road-images", type=int, default=20, metavar="N",
                   help="with --sanity: ROAD on the first N scenes (its imputation is the slow part; default 20)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--device", default="cpu", metavar="DEV")


def run(args) -> int:
    if args.num_images < 1 or args.num_images > 1000:
        return fail(f"--num-images must be in 1..1000 (the held-out set), got {args.num_images}")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps < 1:
        return fail(f"--steps must be >= 1, got {args.steps}")
    if args.sanity and args.model != "shapes-vit":
        return fail("--sanity needs a classifier: use --model shapes-vit")
    if args.sanity and args.road_images < 0:
        return fail(f"--road-images must be >= 0, got {args.road_images}")
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            return fail("--methods is empty; give registered map methods, e.g. --methods rollout,relevance")
        if args.model != "shapes-vit":
            return fail("--methods chooses the map methods of a classifier: use it with --model shapes-vit")
        from ...explain import single_map_method

        for name in methods:  # unknown names, per-word methods and missing extras fail before the model loads
            single_map_method(name, "benchmark-maps")
    import time

    from ..._util.extras import EXTRAS, has_extra
    from ..._util.progress import progress_bar
    from ...models import load_model
    from ...zoo.benchmark import evaluate_captioner, evaluate_classifier

    flow = not args.no_flow and has_extra("flow")
    if not args.no_flow and not flow and args.model == "shapes-vit" and not args.sanity:
        # --sanity: the sanity checks leave flow out themselves, with their own note
        print(f"vitviz: note: attention flow is skipped: its solver '{EXTRAS['flow'].distribution}' is "
              "not installed (pip install 'vitviz[flow]')", file=sys.stderr)
    model = load_model(args.model, weights=args.weights, device=args.device)
    t0 = time.time()
    if args.sanity:
        from ...zoo.benchmark import evaluate_sanity

        leave_out = (["flow"] if args.no_flow else []) + (["relevance", "grad_rollout"] if args.no_relevance else [])
        if methods is not None and any(m in leave_out for m in methods):
            gone = [m for m in methods if m in leave_out]
            methods = [m for m in methods if m not in leave_out]
            if not methods:
                return fail(f"--methods {args.methods} leaves nothing after --no-flow / --no-relevance")
            print(f"vitviz: note: {', '.join(gone)} left out (--no-flow / --no-relevance)", file=sys.stderr)
        table = evaluate_sanity(model, n=args.num_images, road_images=args.road_images, steps=args.steps,
                                 batch_size=args.batch_size, methods=methods, tokens=not args.no_deletion,
                                 leave_out=leave_out,
                                 progress=lambda m: print(f"[{time.time() - t0:6.1f} s] {m}", file=sys.stderr))
        print(f"shapes-vit, {table.n} held-out scenes (ROAD on {table.extra['road_images']}): rank correlation, "
              "SSIM and top-k overlap with the trained map after the head, then all layers, were re-initialised "
              "(lower: the map depends on the model); token and ROAD curves of the class probability")
        print(table.format(markdown=args.markdown))
        for note in table.notes:
            print(f"note: {note}")
        print("seconds per method: " + ", ".join(f"{k} {v:.1f}" for k, v in table.extra["seconds"].items()))
        print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
        return 0
    bar = progress_bar(total=args.num_images, unit="img", desc=args.model)

    def progress(done, total):
        bar.update(done - bar.n)

    if args.model == "shapes-clip":  # text maps: their own benchmark (vitviz/zoo/benchmark_clip.py)
        from ...zoo.benchmark_clip import benchmark_clip

        table = benchmark_clip(model, n=args.num_images, progress=progress)
        head = (f"shapes-clip, {table.n} held-out caption scenes, 2 object phrases each; phrase retrieval "
                f"{table.extra['retrieval']:.3f}; pointing game: the maximal patch's centre within 4 px of "
                "the named object")
    elif args.model == "shapes-vit":
        table = evaluate_classifier(model, n=args.num_images, batch_size=args.batch_size,
                                     steps=args.steps, deletion=not args.no_deletion,
                                     relevance=not args.no_relevance, flow=flow, methods=methods,
                                     progress=progress)
        head = f"shapes-vit, {table.n} held-out scenes, accuracy {table.extra['accuracy']:.3f}"
    else:
        table = evaluate_captioner(model, n=args.num_images, batch_size=args.batch_size,
                                    progress=progress)
        head = (f"shapes-captioner, {table.n} held-out scenes, greedy caption exact match "
                f"{table.extra['exact_match']:.3f}; word grounding = pointing game of colour and "
                "shape words (teacher-forced ground-truth captions)")
    bar.close()
    print(head)
    print(table.format(markdown=args.markdown))
    for note in table.notes:
        print(f"note: {note}")
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0
