"""Train the bundled ``shapes-clip`` and write its weights into the package.

Reproduce the shipped files (CPU, fixed seeds, two threads; a few minutes)::

    python -m tools.train.train_clip tokenizer   # vitviz/zoo/weights/shapes-clip.tokenizer.json
    python -m tools.train.train_clip train       # vitviz/zoo/weights/shapes-clip.safetensors + .json
    python -m tools.train.train_clip eval        # pointing game of the shipped weights (held-out scenes)

Data: caption scenes (two objects) and classification scenes (one object), seeds from the
training range. Each image is paired with one text: its caption (``"a red star above a blue
circle"``) or the phrase of one of its objects (``"a red star"``). Horizontal flips (with
"left" and "right" swapped in the caption) double the data.

Loss: CLIP's symmetric contrastive loss (Radford et al. 2021) over the batch, with every pair
that is true counted as a positive (a phrase is true of every image holding that object; a
caption of every image with that caption), the target spread evenly over the positives; plus
token labeling (Jiang et al. 2021) as in :mod:`tools.train.train`: a linear layer on every
final patch token predicts the colour and the shape of the object covering it. That layer
exists only during training: the shipped model is a plain transformers ``CLIPModel``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from tools.train.train import map_chunks, save_weights
from vitviz.models.bundled import shapes_clip as zc
from vitviz.models.bundled.shapes import WEIGHTS_DIR, to_input
from vitviz.zoo.scenes import COLOURS, SHAPES, TRAIN_SEEDS, make_dataset

NAME = "shapes-clip"
PATCH_LABEL_COVERAGE = 0.25


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phrase(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _patch_labels(scene, grid: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per patch the shape and colour of the object covering most of it (background: the last class)."""
    k = scene.image.shape[0] // grid
    cov = np.stack([o.coverage.reshape(grid, k, grid, k).mean(axis=(1, 3)) for o in scene.objects])  # [K, g, g]
    best, on = cov.argmax(0), cov.max(0) >= PATCH_LABEL_COVERAGE
    shapes = np.array([SHAPES.index(o.shape) for o in scene.objects])[best]
    colours = np.array([list(COLOURS).index(o.colour) for o in scene.objects])[best]
    return np.where(on, shapes, len(SHAPES)), np.where(on, colours, len(COLOURS))


def _chunk(job):
    kind, seeds = job
    scenes = make_dataset(kind, seeds)
    labels = [_patch_labels(s) for s in scenes]
    return (np.stack([s.image for s in scenes]),
            [[(o.colour, o.shape) for o in s.objects] for s in scenes],
            [s.words for s in scenes],
            np.stack([a for a, _ in labels]).astype(np.int64),
            np.stack([b for _, b in labels]).astype(np.int64))


def generate(kind: str, seeds, workers: int = 1) -> dict:
    """Scenes as arrays: images ``[N, H, W, 3]``, objects, caption words, patch labels ``[N, 8, 8]``."""
    parts = map_chunks(_chunk, kind, list(seeds), workers)
    return {"images": np.concatenate([p[0] for p in parts]),
            "objects": [o for p in parts for o in p[1]],
            "words": [w for p in parts for w in p[2]],
            "shapes": np.concatenate([p[3] for p in parts]),
            "colours": np.concatenate([p[4] for p in parts])}


def _flip_words(words: list[str]) -> list[str]:
    return ["right" if w == "left" else "left" if w == "right" else w for w in words]


def _pairs(rng: np.random.Generator, objects: list, words: list, flips: np.ndarray, caption_p: float):
    """One text per image (a caption or one object's phrase) and the ``[B, B]`` truth of every
    image-text pair."""
    texts, kinds = [], []
    for objs, w, f in zip(objects, words, flips, strict=True):
        if len(objs) > 1 and rng.random() < caption_p:
            texts.append(" ".join(_flip_words(w) if f else w))
            kinds.append(("caption", texts[-1]))
        else:
            c, s = objs[int(rng.integers(len(objs)))]
            texts.append(phrase(c, s))
            kinds.append(("phrase", (c, s)))
    caps = [" ".join(_flip_words(w) if f else w) for w, f in zip(words, flips, strict=True)]
    truth = np.zeros((len(texts), len(texts)), dtype=bool)
    for i, (objs, cap) in enumerate(zip(objects, caps, strict=True)):
        present = set(objs)
        for j, (kind, val) in enumerate(kinds):
            truth[i, j] = (val in present) if kind == "phrase" else (val == cap)
    return texts, torch.from_numpy(truth)


def contrastive_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy with the targets spread over every true pair.

    Shape:
        logits, truth: ``[B, B]`` (images x texts) -> scalar
    """
    t = truth.float()
    li = -(torch.log_softmax(logits, dim=1) * (t / t.sum(1, keepdim=True))).sum(1).mean()
    lt = -(torch.log_softmax(logits, dim=0) * (t / t.sum(0, keepdim=True))).sum(0).mean()
    return 0.5 * (li + lt)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(args) -> dict:
    """Train ``shapes-clip`` and write its weights; returns the info written next to them."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    n_cap, n_cls = args.scenes, args.scenes // 2
    seeds = list(TRAIN_SEEDS)
    cap = generate("caption", seeds[:n_cap], args.workers)
    cls = generate("classification", seeds[n_cap:n_cap + n_cls], args.workers)
    data = {k: (np.concatenate([cap[k], cls[k]]) if isinstance(cap[k], np.ndarray) else cap[k] + cls[k])
            for k in cap}
    n = len(data["objects"])
    _log(f"{n} scenes in {time.time() - t0:.0f} s")
    tok = zc.load_tokenizer(args.out / zc.TOKENIZER_FILE if (args.out / zc.TOKENIZER_FILE).is_file() else None)
    model = zc.shapes_clip_module()
    model.train()
    width = model.config.vision_config.hidden_size
    token_head = torch.nn.Linear(width, len(SHAPES) + 1 + len(COLOURS) + 1)
    params = list(model.parameters()) + list(token_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, args.steps, args.warmup))
    images = torch.from_numpy(data["images"])
    for step in range(args.steps):
        idx = np.sort(rng.choice(n, size=args.batch_size, replace=False))
        flips = rng.random(len(idx)) < 0.5
        f = torch.from_numpy(flips)
        x = to_input(images[idx].numpy())  # [B, 3, H, W]
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        ps = torch.from_numpy(data["shapes"][idx])
        pc = torch.from_numpy(data["colours"][idx])
        ps = torch.where(f[:, None, None], ps.flip(-1), ps)
        pc = torch.where(f[:, None, None], pc.flip(-1), pc)
        texts, truth = _pairs(rng, [data["objects"][i] for i in idx], [data["words"][i] for i in idx], flips,
                              args.caption_p)
        enc = tok(texts, padding=True, return_tensors="pt")
        vis = model.vision_model(pixel_values=x)
        img = model.visual_projection(vis.pooler_output)
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, B]
        loss_c = contrastive_loss(logits, truth)
        tokens = token_head(vis.last_hidden_state[:, 1:])  # [B, 64, S+1+C+1]
        s_logits, c_logits = tokens.split([len(SHAPES) + 1, len(COLOURS) + 1], dim=-1)
        w = (ps.flatten() != len(SHAPES)).float() * 4 + 1  # object patches weigh 5x
        loss_t = ((torch.nn.functional.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), ps.flatten(),
                                                     reduction="none")
                   + torch.nn.functional.cross_entropy(c_logits.reshape(-1, c_logits.shape[-1]), pc.flatten(),
                                                       reduction="none")) * w).sum() / w.sum()
        loss = loss_c + args.token_weight * loss_t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            _log(f"step {step}/{args.steps} contrastive {loss_c.item():.3f} tokens {loss_t.item():.3f} "
                 f"scale {model.logit_scale.exp().item():.1f} ({time.time() - t0:.0f} s)")
    model.eval()
    with torch.no_grad():  # evaluate what is shipped: float16 weights
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.to(torch.float16).to(p.dtype))
    info = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("cmd",)},
            "train_seconds": round(time.time() - t0), "torch": torch.__version__}
    save_weights(model, NAME, Path(args.out), info)
    _log(f"saved {args.out / (NAME + '.safetensors')}")
    return info


def evaluate(args, path: Path | None = None) -> dict:
    """Held-out pointing game of every method (and the retrieval accuracy) of the weights in ``args.out``."""
    from vitviz.models import load_model
    from vitviz.zoo.benchmark_clip import benchmark_clip

    vm = load_model(NAME, weights=str(path or args.out / f"{NAME}.safetensors"))
    table = benchmark_clip(vm, n=args.eval_images)
    print(table.format())
    return {"pointing_game": {k: round(v["pointing"], 4) for k, v in table.rows.items()},
            "phrase_retrieval": round(table.extra["retrieval"], 4), "heldout_scenes": table.n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train.train_clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=("tokenizer", "train", "eval"))
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--scenes", type=int, default=8000, help="caption scenes (plus half as many one-object scenes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--caption-p", type=float, default=0.3, help="share of two-object images paired with the caption")
    p.add_argument("--token-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "tokenizer":
        zc.build_tokenizer_file(args.out / zc.TOKENIZER_FILE)
        _log(f"wrote {args.out / zc.TOKENIZER_FILE}")
        return 0
    if args.cmd == "train":
        info = train(args)
        info["heldout"] = evaluate(args)
        _save_info(args.out, info)
        print(json.dumps(info["heldout"], indent=2))
        return 0
    print(json.dumps(evaluate(args), indent=2))
    return 0


def _save_info(out_dir: Path, info: dict) -> None:
    tmp = out_dir / f"{NAME}.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{NAME}.json")


if __name__ == "__main__":
    raise SystemExit(main())
