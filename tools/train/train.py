"""Train the bundled models on procedural scenes and write their weights into the package.

Reproduce the shipped weights (CPU, two threads, fixed seeds; a few minutes each)::

    python -m tools.train.train tokenizer      # vitviz/zoo/weights/shapes-captioner.tokenizer.json
    python -m tools.train.train vit            # vitviz/zoo/weights/shapes-vit.safetensors
    python -m tools.train.train captioner      # vitviz/zoo/weights/shapes-captioner.safetensors
    python -m tools.train.train eval           # held-out numbers of the weights in the package

Each training run generates its scenes (seeds 0 .. N-1, cached as ``.npz`` under
``--cache``), trains with AdamW (linear warm-up, cosine decay), evaluates on the held-out
seeds (:data:`~vitviz.zoo.scenes.HELDOUT_SEEDS`), and writes the weights as float16
safetensors plus a JSON file with the settings and the held-out numbers. Torch uses
``--threads`` threads (default 2), scene generation ``--workers`` processes (default 2).

How the models learn in minutes on a CPU:

* **Token labeling** (Jiang et al. 2021, "All Tokens Matter: Token Labeling for Training
  Better Vision Transformers"): besides the CLS classifier's loss, a linear layer on every
  final patch token predicts the shape (and, for the captioner, the colour) of the object
  covering that patch, or background; object patches weigh 5x. For ``shapes-vit`` a second
  linear layer predicts each patch's 8x8 object mask. These layers exist only during
  training: the shipped models are the plain timm / transformers architectures, and the
  CLS token has to learn on its own where to read the class from.
* The captioner's ViT encoder starts from the trained ``shapes-vit`` (converted by
  :func:`~vitviz.models.bundled.shapes.timm_vit_to_hf_encoder`), and an extra linear layer makes every
  encoder patch token predict its own row and column, so that the relation words ("above",
  "left of") can be read from the encoder output. Horizontal flips (with "left" and "right"
  swapped in the caption) double the data.

The weights are reproducible for a fixed number of threads on the same CPU type; another
thread count or CPU may change float rounding and so give slightly different (equally
good) weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vitviz.models.bundled import shapes as zm
from vitviz.zoo import scenes
from vitviz.zoo.scenes import COLOURS, HELDOUT_SEEDS, SHAPES, make_dataset

CAPTION_WORD_LEFT, CAPTION_WORD_RIGHT = "left", "right"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

PATCH_LABEL_COVERAGE = 0.25  # a patch is labelled with an object from this share of its pixels on


def patch_labels(scene, grid: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Token labels of a scene (Jiang et al. 2021, "All Tokens Matter: Token Labeling for
    Training Better Vision Transformers"): per patch, the shape and the colour of the object
    covering most of it, or ``len(SHAPES)`` / ``len(COLOURS)`` (background) when no object
    covers at least :data:`PATCH_LABEL_COVERAGE` of it.

    Returns:
        ``([grid, grid], [grid, grid])`` int64 shape and colour labels.
    """
    h = scene.image.shape[0]
    k = h // grid
    cov = np.stack([o.coverage.reshape(grid, k, grid, k).mean(axis=(1, 3))
                    for o in scene.objects])  # [K, g, g]
    best = cov.argmax(0)  # [g, g]
    on = cov.max(0) >= PATCH_LABEL_COVERAGE
    shapes = np.array([SHAPES.index(o.shape) for o in scene.objects])[best]
    colours = np.array([list(COLOURS).index(o.colour) for o in scene.objects])[best]
    return (np.where(on, shapes, len(SHAPES)).astype(np.int64),
            np.where(on, colours, len(COLOURS)).astype(np.int64))


def _gen_chunk(job):
    kind, seeds = job
    scenes = make_dataset(kind, seeds)
    images = np.stack([s.image for s in scenes])  # [n, H, W, 3] uint8
    labels = np.array([s.label for s in scenes], dtype=np.int64)
    captions = [s.caption for s in scenes]
    tl = [patch_labels(s) for s in scenes]
    masks = np.stack([s.masks.any(0) for s in scenes]).astype(np.uint8)  # [n, H, W] all objects
    return images, labels, captions, np.stack([t[0] for t in tl]), np.stack([t[1] for t in tl]), masks


def map_chunks(fn, kind: str, seeds: list, workers: int, size: int = 500) -> list:
    """``fn((kind, chunk))`` for the seeds in chunks of ``size``, in ``workers`` forked processes
    (in this one when ``workers <= 1``), in order."""
    chunks = [(kind, seeds[i:i + size]) for i in range(0, len(seeds), size)]
    if workers <= 1:
        return [fn(c) for c in chunks]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, chunks)


def generate(kind: str, seeds, workers: int = 2, cache: Path | None = None) -> dict:
    """The scenes of ``seeds`` as arrays.

    Returns:
        ``{"images": [N, H, W, 3] uint8, "labels": [N], "captions": list[str],
        "patch_shapes": [N, 8, 8], "patch_colours": [N, 8, 8]`` (see :func:`patch_labels`),
        ``"masks": [N, H, W]`` uint8 (union of the object masks)}``.
    """
    seeds = list(seeds)
    path = None
    keys = ("images", "labels", "captions", "patch_shapes", "patch_colours", "masks")
    if cache is not None:
        import hashlib

        version = hashlib.sha1(Path(scenes.__file__).read_bytes()).hexdigest()[:8]
        path = Path(cache) / f"{kind}-{seeds[0]}-{len(seeds)}-{version}.npz"
        if path.is_file():
            z = np.load(path)
            d = {k: z[k] for k in keys}
            d["captions"] = [str(c) for c in d["captions"]]
            return d
    parts = map_chunks(_gen_chunk, kind, seeds, workers)
    d = {k: (np.concatenate([p[i] for p in parts]) if k != "captions" else [c for p in parts for c in p[i]])
         for i, k in enumerate(keys)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: (np.array(v) if k == "captions" else v) for k, v in d.items()})
    return d


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def save_weights(model: torch.nn.Module, name: str, out_dir: Path, info: dict) -> Path:
    """Write ``<name>.safetensors`` (float16) and ``<name>.json`` (``info``) into ``out_dir``, each
    to a temporary name first, then renamed."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
          for k, v in model.state_dict().items()}
    path = out_dir / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"vitviz": name, "dtype": "float16"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    tmp_json = out_dir / f"{name}.json.tmp"
    tmp_json.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_json, out_dir / f"{name}.json")
    return path


def _roundtrip_fp16(model: torch.nn.Module) -> None:
    """Round the weights to float16 and back, as shipped, so evaluation sees the shipped model."""
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.to(torch.float16).to(p.dtype))


# ---------------------------------------------------------------------------------------------
# evaluation (also used by the tests and `vitviz benchmark-maps`)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def classifier_accuracy(module: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                        batch_size: int = 250) -> float:
    """Share of images whose arg-max class equals the label."""
    module.eval()
    hits = 0
    for i in range(0, len(images), batch_size):
        logits = module(zm.to_input(images[i:i + batch_size]))  # [b, C]
        hits += int((logits.argmax(-1).numpy() == labels[i:i + batch_size]).sum())
    return hits / len(images)


@torch.no_grad()
def caption_scores(module: torch.nn.Module, tokenizer, images: np.ndarray, captions: list[str],
                   batch_size: int = 250) -> dict:
    """Greedy captions vs the ground truth.

    Returns:
        ``{"exact_match": share of captions equal word for word, "word_accuracy": share of
        ground-truth word positions where the generated word is the same (a missing word
        counts as wrong), "object_accuracy": share of the (colour, shape) pairs named right,
        in order, "relation_accuracy": share of captions with the right relation}``
    """
    module.eval()
    exact = words_ok = words_all = objects_ok = relations_ok = 0
    for i in range(0, len(images), batch_size):
        seq = module.generate(pixel_values=zm.to_input(images[i:i + batch_size]),
                              max_new_tokens=zm.MAX_CAPTION_TOKENS - 1)  # [b, T]
        texts = tokenizer.batch_decode(seq, skip_special_tokens=True)
        for got, want in zip(texts, captions[i:i + batch_size]):
            g, w = got.split(), want.split()
            exact += int(g == w)
            words_ok += sum(int(j < len(g) and g[j] == w[j]) for j in range(len(w)))
            words_all += len(w)
            if len(g) >= 6:
                objects_ok += int(g[1:3] == w[1:3]) + int(g[-2:] == w[-2:])
                relations_ok += int(g[3:-3] == w[3:-3])
    n = len(images)
    return {"exact_match": exact / n, "word_accuracy": words_ok / words_all,
            "object_accuracy": objects_ok / (2 * n), "relation_accuracy": relations_ok / n}


@torch.no_grad()
def rollout_pointing(module: torch.nn.Module, seeds, batch_size: int = 100) -> dict:
    """Mean pointing game of attention rollout and of random maps on classification scenes."""
    from vitviz.analyze import rollout
    from vitviz.attention import capture
    from vitviz.evaluate.metrics import pointing_game, random_maps
    from vitviz.models import wrap

    vm = wrap(module)
    scenes = make_dataset("classification", seeds)
    g = torch.Generator().manual_seed(0)
    hits = {"rollout": [], "random": []}
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        masks = torch.from_numpy(np.stack([s.mask for s in chunk]))  # [b, H, W]
        with capture(vm) as rec:
            vm(zm.to_input(np.stack([s.image for s in chunk])))
        maps = rollout(rec.attentions)  # [b, gh, gw]
        hits["rollout"].append(pointing_game(maps, masks))
        hits["random"].append(pointing_game(random_maps(len(chunk), maps.shape[-2:], generator=g), masks))
    return {k: float(torch.cat(v).mean()) for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Batches:
    """Mini-batch indices: shuffled epochs over ``n`` items, from a seeded generator."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator):
        self.n, self.bs, self.rng = n, batch_size, rng
        self.order, self.pos = rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.pos + self.bs > self.n:
            self.order, self.pos = self.rng.permutation(self.n), 0
        idx = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return np.sort(idx)


def _flip(rng, x: torch.Tensor, *grids: torch.Tensor):
    """Flip half of a batch left-right: images ``[B, 3, H, W]`` and label grids ``[B, gh, gw]``."""
    f = torch.from_numpy(rng.random(x.shape[0]) < 0.5)  # [B]
    out = [torch.where(f[:, None, None, None], x.flip(-1), x)]
    out += [torch.where(f[:, None, None], g.flip(-1), g) for g in grids]
    return f, out


def _optimizer(params, args, total: int):
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, args.warmup))
    return opt, sched


def _token_loss(logits: torch.Tensor, target: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Cross-entropy over patches, object patches weighted ``object_weight`` times background ones.

    Shape:
        logits ``[M, K + 1]`` (the last class is background), target ``[M]`` -> scalar
    """
    w = torch.where(target == logits.shape[-1] - 1, 1.0, float(object_weight))  # [M]
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")  # [M]
    return (w * loss).sum() / w.sum()


def train_vit(args) -> dict:
    """Train ``shapes-vit`` and write its weights; returns the info written next to them.

    Loss: cross-entropy of the CLS classifier (label smoothing 0.1) plus ``args.aux`` times the
    token-labeling loss (Jiang et al. 2021): a linear layer on every final patch token
    predicts the shape covering that patch, or background. The linear layer is used only in
    training and is not shipped; the shipped model is the plain timm ``VisionTransformer``.
    """
    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = generate("classification", range(args.train_size), args.workers, args.cache)
    images, labels, tok_labels = data["images"], data["labels"], torch.from_numpy(data["patch_shapes"])
    pix = torch.from_numpy(data["masks"])  # [N, H, W] uint8
    _log(f"{len(images)} training scenes in {time.time() - t0:.0f}s")
    model = zm.shapes_vit_module()
    aux = torch.nn.Linear(model.embed_dim, len(SHAPES) + 1)
    ps = zm.PATCH
    aux_mask = torch.nn.Linear(model.embed_dim, ps * ps)
    opt, sched = _optimizer(list(model.parameters()) + list(aux.parameters()) + list(aux_mask.parameters()),
                            args, args.steps)
    batches = _Batches(len(images), args.batch_size, rng)
    model.train()
    run = np.zeros(3)
    for step in range(args.steps):
        idx = batches.next()
        y = torch.from_numpy(labels[idx])  # [B]
        _, (x, t, m) = _flip(rng, zm.to_input(images[idx]), tok_labels[idx], pix[idx])
        feats = model.forward_features(x)  # [B, 1 + P, D]
        logits = model.forward_head(feats)  # [B, C]
        patches = feats[:, model.num_prefix_tokens:]  # [B, P, D]
        tok = aux(patches)  # [B, P, C + 1]
        loss_cls = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
        loss_tok = _token_loss(tok.reshape(-1, tok.shape[-1]), t.reshape(-1), args.object_weight)
        loss = loss_cls + args.aux * loss_tok
        if args.mask_aux:
            b, h, w = m.shape
            target = m.reshape(b, h // ps, ps, w // ps, ps).permute(0, 1, 3, 2, 4).reshape(b, -1, ps * ps)
            loss = loss + args.mask_aux * torch.nn.functional.binary_cross_entropy_with_logits(
                aux_mask(patches), target.float())  # [B, P, ps*ps] pixels of each patch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run += [loss_cls.item(), loss_tok.item(), float((logits.argmax(-1) == y).float().mean())]
        if (step + 1) % args.log_every == 0:
            run /= args.log_every
            _log(f"step {step + 1}/{args.steps} loss {run[0]:.3f} token loss {run[1]:.3f} acc {run[2]:.3f}")
            run[:] = 0
    train_time = time.time() - t0
    model.eval()
    _roundtrip_fp16(model)
    held = generate("classification", _heldout(args), args.workers, args.cache)
    acc = classifier_accuracy(model, held["images"], held["labels"])
    pointing = rollout_pointing(model, _heldout(args)[:300])
    _log(f"held-out accuracy {acc:.4f} ({len(held['images'])} scenes), rollout pointing game "
         f"{pointing['rollout']:.3f} (random {pointing['random']:.3f}), trained in {train_time:.0f}s")
    info = dict(model="shapes-vit", heldout_accuracy=acc,
                heldout_rollout_pointing=round(pointing["rollout"], 4),
                heldout_random_pointing=round(pointing["random"], 4),
                heldout_seeds=[_heldout(args).start, _heldout(args).stop],
                train_seconds=round(train_time), **_settings(args))
    path = save_weights(model, "shapes-vit", Path(args.out), info)
    _log(f"wrote {path}")
    return info


def _init_encoder(model, path: Path) -> None:
    """Start the captioner's encoder from trained ``shapes-vit`` weights (checked to compute the same)."""
    from vitviz.models import read_state_dict

    if not path.is_file():
        raise SystemExit(f"{path} not found: train the classifier first (`python -m tools.train.train vit`) "
                         "or pass --encoder-from none")
    vit = zm.shapes_vit_module().eval()
    vit.load_state_dict(read_state_dict(path))
    missing, unexpected = model.encoder.load_state_dict(zm.timm_vit_to_hf_encoder(vit.state_dict()),
                                                        strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise SystemExit(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    x = torch.randn(2, 3, zm.IMAGE_SIZE, zm.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    model.encoder.eval()
    with torch.no_grad():
        diff = (vit.forward_features(x) - model.encoder(pixel_values=x).last_hidden_state).abs().max()
    if diff > 1e-4:
        raise SystemExit(f"the converted encoder differs from {path} by {diff}")
    _log(f"encoder initialised from {path}")


def train_captioner(args) -> dict:
    """Train ``shapes-captioner`` and write its weights; returns the info written next to them.

    Loss: next-word cross-entropy (label smoothing 0.05) plus ``args.aux`` times token
    labeling on the encoder's patch tokens (two linear layers predict the shape and the
    colour covering each patch; used only in training, not shipped). Horizontal flips swap
    "left" and "right" in the caption.
    """
    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tok_path = Path(args.out) / zm.TOKENIZER_FILE
    if not tok_path.is_file():
        zm.build_tokenizer_file(tok_path)
    tokenizer = zm.load_tokenizer(tok_path)
    vocab = tokenizer.get_vocab()
    data = generate("caption", range(args.train_size), args.workers, args.cache)
    images = data["images"]
    t_shape, t_colour = torch.from_numpy(data["patch_shapes"]), torch.from_numpy(data["patch_colours"])
    ids = zm.caption_ids(data["captions"], tokenizer)  # [N, T] words, [EOS], [PAD]...
    swap = torch.arange(len(vocab))  # a horizontal flip swaps "left" and "right"
    left, right = vocab[CAPTION_WORD_LEFT], vocab[CAPTION_WORD_RIGHT]
    swap[left], swap[right] = right, left
    _log(f"{len(images)} training scenes in {time.time() - t0:.0f}s")
    model = zm.shapes_captioner_module()
    if args.encoder_from != "none":
        _init_encoder(model, Path(args.out) / "shapes-vit.safetensors" if args.encoder_from == "auto"
                      else Path(args.encoder_from))
    dim = model.config.encoder.hidden_size
    aux_shape, aux_colour = torch.nn.Linear(dim, len(SHAPES) + 1), torch.nn.Linear(dim, len(COLOURS) + 1)
    g = zm.IMAGE_SIZE // zm.PATCH
    aux_pos = torch.nn.Linear(dim, 2 * g)  # row and column of each patch token
    pos_target = torch.arange(g * g)  # [P] row-major patch index
    params = [p for mod in (model, aux_shape, aux_colour, aux_pos) for p in mod.parameters()]
    opt, sched = _optimizer(params, args, args.steps)
    batches = _Batches(len(images), args.batch_size, rng)
    bos, pad = vocab["[BOS]"], vocab["[PAD]"]
    model.train()
    run = np.zeros(3)
    ce = torch.nn.functional.cross_entropy
    for step in range(args.steps):
        idx = batches.next()
        f, (x, ts, tc) = _flip(rng, zm.to_input(images[idx]), t_shape[idx], t_colour[idx])
        y = torch.where(f[:, None], swap[ids[idx]], ids[idx])  # [B, T]
        dec_in = torch.cat([torch.full_like(y[:, :1], bos), y[:, :-1]], 1)  # [B, T]
        out = model(pixel_values=x, decoder_input_ids=dec_in, decoder_attention_mask=torch.ones_like(dec_in))
        logits = out.logits  # [B, T, V]
        valid = y != pad  # [B, T]
        loss_words = ce(logits[valid], y[valid], label_smoothing=0.05)
        patches = out.encoder_last_hidden_state[:, 1:]  # [B, P, D] (after the CLS token)
        ow = args.object_weight
        loss_tok = 0.5 * (_token_loss(aux_shape(patches).flatten(0, 1), ts.reshape(-1), ow)
                          + _token_loss(aux_colour(patches).flatten(0, 1), tc.reshape(-1), ow))
        loss = loss_words + args.aux * loss_tok
        if args.pos_aux:
            pl = aux_pos(patches)  # [B, P, 2g]: keep where each token is, for the relation words
            rows, cols = (pos_target // g).repeat(len(idx)), (pos_target % g).repeat(len(idx))
            loss = loss + args.pos_aux * 0.5 * (ce(pl[..., :g].flatten(0, 1), rows)
                                                 + ce(pl[..., g:].flatten(0, 1), cols))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        word_acc = float((logits.argmax(-1)[valid] == y[valid]).float().mean())
        run += [loss_words.item(), loss_tok.item(), word_acc]
        if (step + 1) % args.log_every == 0:
            run /= args.log_every
            _log(f"step {step + 1}/{args.steps} loss {run[0]:.3f} token loss {run[1]:.3f} "
                 f"word acc {run[2]:.3f}")
            run[:] = 0
    train_time = time.time() - t0
    model.eval()
    _roundtrip_fp16(model)
    held = generate("caption", _heldout(args), args.workers, args.cache)
    scores = caption_scores(model, tokenizer, held["images"], held["captions"])
    _log(f"held-out exact match {scores['exact_match']:.4f}, word accuracy "
         f"{scores['word_accuracy']:.4f}, objects {scores['object_accuracy']:.4f}, relation "
         f"{scores['relation_accuracy']:.4f}, trained in {train_time:.0f}s")
    info = dict(model="shapes-captioner", heldout_exact_match=scores["exact_match"],
                heldout_word_accuracy=scores["word_accuracy"],
                heldout_object_accuracy=scores["object_accuracy"],
                heldout_relation_accuracy=scores["relation_accuracy"],
                heldout_seeds=[_heldout(args).start, _heldout(args).stop],
                train_seconds=round(train_time), **_settings(args))
    path = save_weights(model, "shapes-captioner", Path(args.out), info)
    _log(f"wrote {path}")
    return info


def evaluate(args) -> dict:
    """Held-out numbers of the weights in ``--out`` (default: the package's)."""
    from vitviz.models import read_state_dict

    out = Path(args.out)
    result = {}
    vit = zm.shapes_vit_module()
    vit.load_state_dict(read_state_dict(out / "shapes-vit.safetensors"))
    held = generate("classification", _heldout(args), args.workers, args.cache)
    result["shapes-vit accuracy"] = classifier_accuracy(vit, held["images"], held["labels"])
    for k, v in rollout_pointing(vit, _heldout(args)[:300]).items():
        result[f"shapes-vit pointing game, {k} maps"] = v
    cap = zm.shapes_captioner_module()
    cap.load_state_dict(read_state_dict(out / "shapes-captioner.safetensors"))
    held = generate("caption", _heldout(args), args.workers, args.cache)
    tokenizer = zm.load_tokenizer(out / zm.TOKENIZER_FILE)
    for k, v in caption_scores(cap, tokenizer, held["images"], held["captions"]).items():
        result[f"shapes-captioner {k}"] = v
    for k, v in result.items():
        print(f"{k}: {v:.4f}")
    return result


def _heldout(args) -> range:
    """The held-out seeds scored after training (all 1000 unless ``--heldout N``)."""
    n = getattr(args, "heldout", None)
    return HELDOUT_SEEDS if n is None else HELDOUT_SEEDS[:n]


def _settings(args) -> dict:
    return dict(train_size=args.train_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                warmup=args.warmup, aux=args.aux, object_weight=args.object_weight, mask_aux=args.mask_aux,
                pos_aux=args.pos_aux, seed=args.seed,
                threads=args.threads, torch=torch.__version__,
                **({"encoder_from": args.encoder_from} if args.what == "captioner" else {}))


DEFAULTS = {
    "vit": dict(train_size=30000, steps=3000, batch_size=64, lr=2e-3, warmup=100, aux=1.0,
                object_weight=5.0, mask_aux=1.0, pos_aux=0.0),
    "captioner": dict(train_size=30000, steps=2500, batch_size=64, lr=1e-3, warmup=100, aux=1.0,
                      object_weight=5.0, mask_aux=0.0, pos_aux=1.0),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tokenizer", "vit", "captioner", "eval"])
    p.add_argument("--out", default=str(zm.WEIGHTS_DIR),
                   help="folder for the weights (default: the package's)")
    p.add_argument("--cache", default=None, help="folder to cache generated scenes in (.npz)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--workers", type=int, default=2, help="scene generation processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, help="training scenes (seeds 0 .. N-1)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--aux", type=float, help="weight of the token-labeling loss")
    p.add_argument("--mask-aux", type=float,
                   help="vit: weight of the per-patch object-mask loss (each patch token predicts "
                        "its pixels)")
    p.add_argument("--pos-aux", type=float,
                   help="captioner: weight of the loss that makes every encoder patch token predict its row "
                        "and column")
    p.add_argument("--object-weight", type=float,
                   help="weight of object patches vs background patches in the token-labeling loss")
    p.add_argument("--encoder-from", default="auto",
                   help="captioner: initial encoder weights, a shapes-vit .safetensors file; 'auto' = "
                        "shapes-vit.safetensors in --out; 'none' = random")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--heldout", type=int, default=None,
                   help="score only the first N held-out scenes (default: all 1000; the smoke test uses a few)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for k, v in DEFAULTS.get(args.what, DEFAULTS["vit"]).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.what == "tokenizer":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        zm.build_tokenizer_file(Path(args.out) / zm.TOKENIZER_FILE)
        print(Path(args.out) / zm.TOKENIZER_FILE)
    elif args.what == "vit":
        train_vit(args)
    elif args.what == "captioner":
        train_captioner(args)
    else:
        evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
