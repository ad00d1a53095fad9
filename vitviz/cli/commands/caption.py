"""`vitviz caption`: caption each image and draw which patches every word looked at."""

from __future__ import annotations

import sys

from ._common import (
    add_look_arguments,
    add_model_arguments,
    add_naming_argument,
    add_output_arguments,
    check_alpha_argument,
    check_output_arguments,
    fail,
    load,
    model_tag,
    output_options,
    print_notes,
    report,
    with_model,
)

NAME = "caption"
HELP = "caption images and show the cross-attention of every word"
DESCRIPTION = ("Generates a caption per image with an image-captioning transformer (ViT-GPT2, BLIP, "
               "any transformers VisionEncoderDecoderModel or local model directory) or a decoder-only "
               "vision-language model (LLaVA-1.5 / NeXT, PaliGemma, Qwen2-VL, Idefics3 / SmolVLM, BLIP-2, "
               "InstructBLIP; --prompt) and writes "
               "<name>_caption.png: the image, then one panel per word with the decoder's "
               "cross-attention of the step that predicted it. Sub-word pieces are merged into "
               "words (--merge, default: mean of the pieces' maps). --name-with-model puts the model "
               "after <name>. Prints every file written.")
EXAMPLE = "vitviz caption girl.jpg street.png --model vit-gpt2 --num-beams 4 --out captions/"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="decoder-only vision-language models (LLaVA, PaliGemma, Qwen2-VL, Idefics3, BLIP-2, ...): "
                        "the text put into the model's chat template with the image (default: 'Describe the image.'); "
                        "the model's processor files must be in its directory or cache")
    p.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="longest caption, in tokens")
    p.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam search width (1: greedy)")
    p.add_argument("--layer", default="-1", metavar="L",
                   help="decoder layer of the cross-attention (negative counts from the end), "
                        "or 'mean' for the mean over layers")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")
    p.add_argument("--merge", choices=["mean", "sum", "max"], default="mean",
                   help="how the maps of a word's sub-word pieces are combined")
    p.add_argument("--rollout", action="store_true",
                   help="compose with the encoder's attention rollout (maps over input patches)")
    p.add_argument("--relevance", action="store_true",
                   help="draw gradient-weighted relevance (Chefer et al. 2021) instead of raw "
                        "cross-attention: one backward pass per word")
    add_look_arguments(p)
    p.add_argument("--max-cols", type=int, default=6, metavar="N", help="panels per row")
    p.add_argument("--out", default="vitviz-out", metavar="DIR")
    add_output_arguments(p)
    add_naming_argument(p)


def _layer(value: str):
    if value == "mean":
        return "mean"
    try:
        return int(value)
    except ValueError:
        return None


def _decodable(module) -> bool:
    """Whether vitviz.caption decodes the module without the Python-only ``decode=`` /
    ``start_ids=``: a transformers encoder-decoder or BLIP captioner, or a ``generate()``."""
    from ...explain.captioning import decodes_without_help

    return decodes_without_help(module)


def _vlm_options(args, model) -> dict | int:
    """``prompt=`` and ``processor=`` for a decoder-only vision-language model, ``{}`` for other
    captioners, or the exit status of a one-line error."""
    from ...errors import VitvizError
    from ...explain.captioning import load_processor, vlm_family

    try:
        family = vlm_family(model.module)
    except VitvizError as e:
        return fail(str(e))
    if family is None:
        if args.prompt is not None:
            return fail("--prompt is for decoder-only vision-language models (LLaVA, PaliGemma, Qwen2-VL, Idefics3, "
                        f"BLIP-2, ...); {model.name} is not one")
        return {}
    processor = load_processor(args.model)
    if processor is None:
        return fail(f"{model.name}: no processor files (preprocessor_config.json, tokenizer, chat template) were "
                    f"found for {args.model}; the command line builds the prompt with the model's processor: save "
                    "it next to the model (processor.save_pretrained(dir)), or caption from Python with input_ids=")
    return dict(prompt=args.prompt, processor=processor)


def run(args) -> int:
    layer = _layer(args.layer)
    if layer is None:
        return fail(f"--layer must be an integer or 'mean', got {args.layer!r}")
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        return fail(f"--num-beams must be >= 1, got {args.num_beams}")
    bad = check_alpha_argument(args)
    if bad is not None:
        return bad
    if args.max_cols < 1:
        return fail(f"--max-cols must be >= 1, got {args.max_cols}")
    bad = check_output_arguments(args)
    if bad is not None:
        return bad
    if args.relevance and args.rollout:
        return fail("--rollout does not apply to --relevance: the relevance already runs through "
                    "the encoder's attention")
    from pathlib import Path

    from ..._util.files import unique_stems
    from ..._util.progress import progress_bar
    from ...analyze.cross import word_grids
    from ...batch import Outcome
    from ...errors import ImageError
    from ...explain.captioning import caption
    from ...models import load_image
    from ...render import caption_strip

    output = output_options(args)
    model = load(args)
    if not _decodable(model.module):  # before any image: the command line's own hint, not Python's
        return fail(f"{model.name} is not a captioner the command line can decode: `vitviz caption` takes "
                    "transformers VisionEncoderDecoderModel and BLIP captioners and models with a generate() "
                    "method (e.g. --model vit-gpt2, blip-base, shapes-captioner, or a local model directory "
                    "of one); other decoders are captioned from Python, with vitviz.caption(..., decode=...)")
    vlm = _vlm_options(args, model)
    if isinstance(vlm, int):
        return vlm
    out = Path(args.out)
    waiting = []  # (outcome, stem, image, grids, words, title) for --norm batch

    def render(o, stem, image, grids, words, title, scales):
        fig, _ = caption_strip(image, grids, words, title=title, max_cols=args.max_cols, cmap=output.cmap,
                               alpha=output.alpha, smooth=output.smooth, norm=output.norm,
                               vmin=[s.vmin for s in scales], vmax=[s.vmax for s in scales],
                               colorbar=output.colorbar, dpi=output.dpi)
        o.outputs.append(output.save_figure(fig, out / f"{stem}_caption"))

    tag = model_tag(args)
    stems = [with_model(s, tag) for s in unique_stems([str(s) for s in args.images])]
    outcomes, noted = [], False
    for source, stem in zip(progress_bar(args.images, unit="img", desc="caption", min_total=2),
                            stems):
        o = Outcome(str(source))
        outcomes.append(o)
        try:
            img = load_image(source)
        except ImageError as e:
            o.error = e.reason
            continue
        cap = caption(model, img, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                      relevance=args.relevance, **vlm)
        if cap.note and not noted:
            print(f"vitviz: note: {cap.note}", file=sys.stderr)
            noted = True
        if args.relevance:
            grids = word_grids(cap, method="relevance", merge=args.merge)  # [W, gh, gw]
        elif layer == "mean":
            grids = word_grids(cap, layer=None, head_fusion=args.head_fusion, merge=args.merge,
                               rollout=args.rollout).mean(dim=0)  # [W, gh, gw]
        else:
            grids = word_grids(cap, layer=layer, head_fusion=args.head_fusion, merge=args.merge,
                               rollout=args.rollout)  # [W, gh, gw]
        grids = grids.detach().float().cpu().numpy()  # [W, gh, gw]
        job = (o, stem, cap.image, grids, [w.text for w in cap.words], cap.text)
        o.prediction = cap.text or "(empty caption)"
        if output.norm == "batch":
            waiting.append(job)
        else:
            render(*job, output.scales(list(grids)))
    if waiting:
        every = [g for w in waiting for g in w[3]]  # every word map of the run
        scale = output.scales(every)[0] if every else None
        for w in waiting:
            render(*w, [scale] * len(w[3]))
    print_notes(output)
    return report(outcomes)
