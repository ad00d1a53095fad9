"""`vitviz text`: where does each image match each text? One strip per image, one panel per text."""

from __future__ import annotations

import sys
import warnings

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

NAME = "text"
HELP = "text -> image maps of a CLIP / SigLIP model: one panel per text, with its score"
DESCRIPTION = (
    "For contrastive image-text models (transformers CLIPModel / SiglipModel, open_clip, the bundled "
    "shapes-clip): which patches make the image match each --text. Methods: chefer (Chefer et al. "
    "2021, default), legrad (Bousselham et al. 2024), maskclip (Zhou et al. 2022). Writes "
    "<name>_text.png (a strip: the image, then one panel per text titled with the model's "
    "image-text logit) and <name>_text.npy ([T, gh, gw] maps, in the order of --text); "
    "--name-with-model puts the model after <name>. Prints every file written.")
EXAMPLE = 'vitviz text shapes.png --model shapes-clip --text "a red circle" --text "a blue square"'


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--text", dest="texts", action="append", required=True, metavar="TEXT",
                   help="a text to locate; repeat for several (one panel each)")
    p.add_argument("--method", choices=["chefer", "legrad", "maskclip", "attnlrp", "cp-lrp"], default="chefer")
    p.add_argument("--start-layer", type=int, default=None, metavar="L",
                   help="first layer taken into account (chefer: 0, legrad: -2)")
    p.add_argument("--max-cols", type=int, default=6, metavar="N", help="panels per row of the strip")
    add_look_arguments(p)
    p.add_argument("--out", default="vitviz-out", metavar="DIR")
    add_output_arguments(p)
    add_naming_argument(p)


def run(args) -> int:
    bad = check_alpha_argument(args)
    if bad is not None:
        return bad
    if args.max_cols < 1:
        return fail(f"--max-cols must be >= 1, got {args.max_cols}")
    empty = [t for t in args.texts if not t.strip()]
    if empty:
        return fail("--text must not be empty: give the words to locate, e.g. --text \"a red circle\"")
    bad = check_output_arguments(args)
    if bad is not None:
        return bad
    from pathlib import Path

    from ..._util.files import save_npy, unique_stems
    from ..._util.progress import progress_bar
    from ...batch import Outcome
    from ...errors import ImageError, UnknownTokenWarning
    from ...explain.text import text_maps, towers
    from ...models import load_image
    from ...render import caption_strip

    output = output_options(args)
    model = load(args)
    towers(model)  # no text tower: one error before any image is read
    out = Path(args.out)
    noted: set[str] = set()
    waiting = []  # (outcome, stem, view, maps, titles) for --norm batch

    def render(o, stem, view, maps, titles, scales):
        fig, _ = caption_strip(view, maps, titles, title=f"{model.name}: {args.method}", max_cols=args.max_cols,
                               cmap=output.cmap, alpha=output.alpha, norm=output.norm,
                               vmin=[s.vmin for s in scales], vmax=[s.vmax for s in scales],
                               colorbar=output.colorbar, smooth=output.smooth, dpi=output.dpi, fontsize=9)
        o.outputs.append(output.save_figure(fig, out / f"{stem}_text"))

    tag = model_tag(args)
    stems = [with_model(s, tag) for s in unique_stems([str(s) for s in args.images])]
    outcomes = []
    bar = progress_bar(args.images, unit="img", desc="text", min_total=2)
    for source, stem in zip(bar, stems, strict=True):
        o = Outcome(str(source))
        outcomes.append(o)
        try:
            img = load_image(source)
        except ImageError as e:
            o.error = e.reason
            continue
        with warnings.catch_warnings(record=True) as caught:  # the notes are printed below, once
            warnings.simplefilter("always", UserWarning)
            res = text_maps(model, img, args.texts, method=args.method, start_layer=args.start_layer)
        unknown = {str(w.message) for w in caught if issubclass(w.category, UnknownTokenWarning)}
        for n in res.notes:
            if n not in noted:  # words outside the vocabulary: a warning (the map cannot see them)
                print(f"vitviz: {'warning' if n in unknown else 'note'}: {n}", file=sys.stderr)
                noted.add(n)
        maps = res.maps.detach().float().cpu().numpy()  # [T, gh, gw]
        o.outputs.append(save_npy(out / f"{stem}_text.npy", maps))
        titles = [f'"{t}"\nlogit {s:.2f}' for t, s in zip(args.texts, res.scores.tolist(), strict=True)]
        best = int(res.scores.argmax())
        o.prediction = f"best match: {args.texts[best]!r} ({res.scores[best].item():.2f})"
        view = model.preprocessor.view(img) if model.preprocessor is not None else None
        job = (o, stem, view, maps, titles)
        if output.norm == "batch":
            waiting.append(job)
        else:
            render(*job, output.scales(list(maps)))
    if waiting:
        every = [m for w in waiting for m in w[3]]
        scale = output.scales(every)[0]
        for w in waiting:
            render(*w, [scale] * len(w[3]))
    print_notes(output)
    return report(outcomes)
