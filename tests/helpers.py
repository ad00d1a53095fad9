"""Test models and helpers shared by the test files (no test file imports another).

Every model is tiny, random and built from a config: nothing is downloaded.
"""

import contextlib
import os
import shutil
import tempfile

import timm
import torch
import transformers
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# the one strong hook check: every hook dict of every module, compared by value (the hook objects)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_hooks")


def hook_state(model):
    """Every module's forward hooks and pre-hooks (with their kwargs / always-called flags) and
    backward hooks, by module name: equal before and after a capture when nothing was left behind."""
    return {n: tuple(dict(getattr(m, d, {})) for d in _HOOK_DICTS) for n, m in model.named_modules()}


def torch_function_modes() -> int:
    """How many torch-function modes are active on this thread (0 outside any capture)."""
    return len(torch.overrides._get_current_function_mode_stack())


def _real_heads(model, *heads):
    for head in heads:
        if isinstance(head, nn.Linear):  # timm and transformers start heads near zero: one class everywhere
            nn.init.normal_(head.weight)
    return model


def tiny_timm(name="vit_tiny_patch16_224", *, real_head=False, **kw):
    """A tiny timm ViT classifier (seed 0): 32 px, 8 px patches, depth 2, 2 heads, width 32, 5 classes.

    ``real_head``: draw the classifier weights from N(0, 1), so that classes differ."""
    torch.manual_seed(0)
    args = dict(pretrained=False, depth=2, num_heads=2, embed_dim=32, num_classes=5, img_size=32, patch_size=8)
    args.update(kw)
    model = timm.create_model(name, **args).eval()
    if real_head:
        _real_heads(model, getattr(model, "head", None), getattr(model, "head_dist", None))
    return model


def tiny_hf(*, real_head=False):
    """A tiny transformers ViT classifier (seed 0): 32 px, 8 px patches, 5 classes."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    model = transformers.ViTForImageClassification(cfg).eval()
    return _real_heads(model, model.classifier) if real_head else model


def inputs(b=3, seed=1):
    """``[b, 3, 32, 32]`` seeded random images."""
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class CourseViT(nn.Module):
    """The ViT of a deep-learning course: Conv2d patches, a CLS token, nn.TransformerEncoder
    (post-norm by default, dropout 0.1). ``seed``: seed the weights."""

    def __init__(self, dim=32, heads=4, depth=2, patch=8, grid=(3, 5), num_classes=5,
                 batch_first=True, norm_first=False, activation="gelu", seed=None):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.batch_first = batch_first
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], dim) * 0.5)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # [B, N-1, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, N, D]
        x = x + self.pos_embed
        return x if self.batch_first else x.transpose(0, 1)  # [B, N, D] or [N, B, D]

    def forward(self, img):
        x = self.encoder(self.embed(img))
        cls = x[:, 0] if self.batch_first else x[0]
        return self.head(cls)


# -- tiny captioners ---------------------------------------------------------------------------

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=8)


def build_ved(seed=0, eos=None) -> nn.Module:
    """ViT encoder + GPT-2 decoder with cross-attention (like nlpconnect/vit-gpt2)."""
    torch.manual_seed(seed)
    enc = transformers.ViTConfig(**TINY_VIT)
    dec = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32,
                                  add_cross_attention=True, is_decoder=True, bos_token_id=1,
                                  eos_token_id=eos, pad_token_id=0)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    model = transformers.VisionEncoderDecoderModel(cfg).eval()
    model.generation_config.eos_token_id = eos
    return model


def build_blip(seed=0, vocab=50) -> nn.Module:
    """BLIP with weights 10x larger than transformers' default init: with std 0.02 its
    cross-attention is uniform to 1e-3 and would make every comparison trivially pass."""
    torch.manual_seed(seed)
    cfg = transformers.BlipConfig(
        vision_config=dict(TINY_VIT, initializer_range=0.2),
        text_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=2, sep_token_id=3, eos_token_id=3,
                         initializer_range=0.2),
        initializer_range=0.2)
    return transformers.BlipForConditionalGeneration(cfg).eval()


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "the", "grass", "run",
         "##ning", "##s", ".", "pizza", "girl", "slice", "of", "holding", "young"]


def bert_tokenizer():
    """A word-piece tokenizer over :data:`VOCAB`."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={v: i for i, v in enumerate(VOCAB)})


def save_tiny_blip(folder, *, processor=False):
    """A tiny BLIP captioner saved as a transformers folder: config, weights and the word-piece
    tokenizer (and, with ``processor``, a 32 px image processor, as a Hub repo has)."""
    build_blip(seed=0, vocab=len(VOCAB)).save_pretrained(folder)
    bert_tokenizer().save_pretrained(folder)
    if processor:
        from transformers import BlipImageProcessor

        BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# -- a real browser (the gallery and explorer pages) ---------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def need_browser() -> None:
    """Skip (on a developer's machine) or fail (in CI, where CI is set) without Debian's chromium,
    chromium-driver and the selenium package."""
    import pytest

    try:
        import selenium  # noqa: F401

        have_selenium = True
    except ImportError:
        have_selenium = False
    missing = [n for n, ok in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                               ("selenium", have_selenium)) if not ok]
    if missing:
        message = (f"{', '.join(missing)} not installed: apt-get install -y chromium chromium-driver; "
                   "pip install selenium")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def headless_chromium(window: str = "1280,2400", performance_log: bool = False):
    """A headless Chromium driven by selenium, with a throw-away profile; the browser console
    (and with ``performance_log`` every network request) is in the driver's logs."""
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vitviz-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={window}"):
        opts.add_argument(arg)
    logs = {"browser": "ALL", "performance": "ALL"} if performance_log else {"browser": "ALL"}
    opts.set_capability("goog:loggingPrefs", logs)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def tiny_word_clip(tok, *, text_layers: int = 2, context: int = 6):
    """A tiny transformers ``CLIPModel`` (random weights, 32 px images, 8 px patches) whose text
    tower reads the word-level tokenizer ``tok``."""
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                         num_attention_heads=4, max_position_embeddings=context, bos_token_id=vocab["[BOS]"],
                         eos_token_id=vocab["[EOS]"], pad_token_id=vocab["[PAD]"]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


# -- counting attention layers, independently of vitviz -------------------------------------------

class AttentionLayerCount(torch.overrides.TorchFunctionMode):
    """The attention layers one forward pass runs, counted without vitviz.

    A layer is a module call inside which an attention op runs: an ``F.scaled_dot_product_attention``
    or ``F.multi_head_attention_forward`` call, or a softmax over the last dimension of a 3-D or
    larger tensor; every op inside one module call is one layer. The module running an op is
    the innermost module being called (forward pre- and post-hooks on every module keep a
    stack), not counting ``nn.Softmax`` / ``nn.Dropout`` / ``nn.Identity``.

    Use: ``with AttentionLayerCount(model) as count: model(x)``; then ``count.layers`` is a
    list of ``(module name, ops)`` in the order the calls began, one per layer. With
    ``keep=True``, ``count.references`` holds each layer's probabilities, one tensor per op:
    a softmax's own output, and for an SDPA call ``softmax(q kᵀ·scale + mask)`` recomputed here
    from the call's own q, k, mask and scale (float64).
    """

    _LEAF = (nn.Softmax, nn.Dropout, nn.Identity)
    _SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __init__(self, model: nn.Module, keep: bool = False):
        super().__init__()
        self.model = model
        self.keep = keep
        self.stack: list[tuple[str, int]] = []
        self.calls = 0
        self.ops: dict[tuple[str, int], list[str]] = {}
        self.refs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.handles: list = []

    def _pre(self, name):
        def hook(_module, _args):
            self.calls += 1
            self.stack.append((name, self.calls))
        return hook

    def _post(self, _module, _args, _out):
        self.stack.pop()

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, self._LEAF):
                continue
            self.handles.append(m.register_forward_pre_hook(self._pre(name or "<root>")))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return super().__exit__(*exc)

    @classmethod
    def sdpa_reference(cls, args, kwargs) -> torch.Tensor:
        """``softmax(q kᵀ·scale + mask)`` of an SDPA call, by its definition, in float64."""
        a = dict(zip(cls._SDPA_ARGS, args), **kwargs)
        q, k = a["query"].double(), a["key"].double()
        if a.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        scale = a.get("scale") or q.shape[-1] ** -0.5
        logits = (q @ k.transpose(-2, -1)) * scale
        if a.get("is_causal"):
            keep = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        mask = a.get("attn_mask")
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
        return logits.softmax(-1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        what = ref = None
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            what = f"sdpa {tuple(q.shape)}"
            if self.keep:
                ref = self.sdpa_reference(args, kwargs)
        elif func is torch.nn.functional.multi_head_attention_forward:
            # nn.MultiheadAttention: its softmax runs inside this call, where no mode sees it
            what = f"multi_head_attention_forward {tuple(args[0].shape)}"
        elif func in (torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax, torch.special.softmax) \
                and isinstance(out, torch.Tensor) and out.dim() >= 3:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(dim, int) and dim % out.dim() == out.dim() - 1:
                what = f"softmax {tuple(out.shape)}"
                if self.keep:
                    ref = out.detach().double()
        if what is not None and self.stack:
            self.ops.setdefault(self.stack[-1], []).append(what)
            if ref is not None:
                self.refs.setdefault(self.stack[-1], []).append(ref)
        return out

    @property
    def layers(self) -> list[tuple[str, list[str]]]:
        return [(name, ops) for (name, _), ops in sorted(self.ops.items(), key=lambda kv: kv[0][1])]

    @property
    def references(self) -> list[list[torch.Tensor]]:
        """Per layer (in the order of :attr:`layers`), the probabilities of each of its ops."""
        return [self.refs.get(key, []) for key in sorted(self.ops, key=lambda k: k[1])]


class SdpaCalls(torch.overrides.TorchFunctionMode):
    """The arguments of every ``F.scaled_dot_product_attention`` call of a forward pass, by name
    (``query``, ``key``, ``value``, ``attn_mask``, ...), in call order, seen without vitviz: e.g. to
    check that a model passes its relative-position bias as SDPA's mask.

    Use: ``with SdpaCalls() as sdpa: model(x)``; then ``sdpa.calls`` is a list of dicts."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append(dict(zip(AttentionLayerCount._SDPA_ARGS, args), **kwargs))
        return func(*args, **kwargs)


def write_video(path, frames, *, fourcc="mp4v", fps=10.0):
    """A real video file written by OpenCV from RGB ``[H, W, 3]`` uint8 frames; returns its path."""
    from pathlib import Path

    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return Path(path)


def decode_all(path):
    """Every frame of a video, RGB, by a plain OpenCV loop (the reference reader)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


class DispatchShapes(TorchDispatchMode):
    """The shape of every tensor any aten op returns while it is active (``shapes``, in order)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out
