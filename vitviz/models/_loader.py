"""`load_model` and `list_models`: aliases, timm names, transformers ids and local files.

Cache first, then the Hub: pretrained weights come from the local Hugging Face / torch hub
cache without any network round trip, else they are downloaded from the Hugging Face Hub
on first use (:mod:`._hub`: huggingface_hub and transformers' own loaders, the standard
cache and environment variables), or from a file given with ``weights=``. Weights that
cannot be had fail within seconds with one message that says what was looked for, where,
and what to do.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError, VitvizError, WeightsNotFoundError
from . import _hub
from ._aliases import ALIASES, Alias

_HF_WEIGHT_FILES = _hub.HF_WEIGHT_FILES


def list_models() -> list[str]:
    """The model aliases vitviz knows (any timm name or transformers id works too).

    Returns:
        The aliases (``"b16"``, ...), then the bundled offline models (``"shapes-vit"``, ...).

    Example:
        >>> "b16" in vitviz.list_models()
        True
    """
    from .bundled import ZOO  # bundled offline models

    return list(ALIASES) + [n for n in ZOO if n not in ALIASES]


@dataclass
class Resolved:
    """Where a model name leads."""

    name: str  # what the user typed
    source: str  # "timm", "transformers" or "zoo"
    model_id: str  # timm name, transformers id or local directory
    exact_size: bool = True  # False: position embeddings are interpolated to image_size
    alias: Alias | None = None


def _timm_names() -> list[str]:
    import timm

    return timm.list_models() + timm.list_models(pretrained=True)


def _looks_like_hf(name: str) -> bool:
    p = Path(name).expanduser()
    return (p.is_dir() and (p / "config.json").is_file()) or (
        name.count("/") == 1 and not name.startswith((".", "/")) and not p.exists())


def resolve(name: str, image_size=None) -> Resolved:
    """Resolve an alias, zoo name, timm name or transformers id; unknown names list close ones."""
    from .bundled import ZOO

    if name in ZOO:
        return Resolved(name, "zoo", name)
    if name in ALIASES:
        alias = ALIASES[name]
        model_id, exact = alias.resolve(image_size)
        return Resolved(name, alias.source, model_id, exact, alias)
    if _looks_like_hf(name):
        return Resolved(name, "transformers", name)
    import timm

    if timm.is_model(name):
        return Resolved(name, "timm", name, image_size is None)
    if Path(name).exists():
        raise ModelNotFoundError(
            f"{name} is a path but not a transformers model directory (no config.json); "
            "to load a weights file use --model <architecture> --weights FILE")
    candidates = list(ALIASES) + list(ZOO) + _timm_names()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not close:  # substrings help with long timm names ("vit_base" -> vit_base_patch16_224, ...)
        close = [c for c in candidates if name.lower() in c.lower()][:5]
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ModelNotFoundError(
        f"unknown model {name!r}{hint}. Run `vitviz models` for the aliases; any timm model name or "
        "transformers id (org/name) or local model directory also works")


# ---------------------------------------------------------------------------------------------
# finding pretrained weights locally
# ---------------------------------------------------------------------------------------------

def _hf_cache_dir() -> str:
    return _hub.cache_dir()


def timm_weights_location(model_id: str) -> tuple[str | None, str]:
    """The local file of a timm model's pretrained weights, and a description of what was sought.

    Returns:
        ``(path or None, "what was looked for, and where")``
    """
    import torch
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_id)
    if cfg is None:
        return None, f"timm has no pretrained weights for {model_id}"
    sought = []
    if cfg.file and os.path.isfile(cfg.file):
        return cfg.file, cfg.file
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_WEIGHT_FILES
        for filename in files:
            path = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None)
            if isinstance(path, str) and os.path.isfile(path):
                return path, path
        sought.append(f"{repo} ({' or '.join(files)}) in the Hugging Face cache {_hf_cache_dir()}")
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url.split("?")[0]))
        if os.path.isfile(path):
            return path, path
        sought.append(path)
    return None, "; ".join(sought) or f"no download source is known for {model_id}"


def _missing_weights(name: str, sought: str, *, need_config: bool = False) -> WeightsNotFoundError:
    what = f"config.json (the architecture) of {name!r}" if need_config else f"pretrained weights for {name!r}"
    return WeightsNotFoundError(
        f"no {what} on this machine (looked for {sought}). {_hub.fixes(name, need_config=need_config)}")


def weights_status(name: str) -> tuple[str, str | None]:
    """Where a model's weights are, without downloading or importing a model library.

    Args:
        name: an alias, a bundled model, a timm name or a transformers id or folder.

    Returns:
        ``(model id, local weights path)``; the path is None when the weights are not cached.

    Raises:
        ModelNotFoundError: ``name`` leads to no known model (the message names close ones).
    """
    r = resolve(name)
    if r.source == "zoo":
        from .bundled import ZOO

        return r.model_id, ZOO[r.name].weights_path()
    if r.source == "timm":
        return r.model_id, timm_weights_location(r.model_id)[0]
    if Path(r.model_id).is_dir():
        return r.model_id, r.model_id
    return r.model_id, _hf_snapshot(r.model_id)


def _hf_snapshot(model_id: str) -> str | None:
    """The cached snapshot folder of a transformers repo when its config and weights are there.

    No transformers import and no network: `vitviz models` stays fast.
    """
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_id, "config.json", cache_dir=_hf_cache_dir())
    if not isinstance(config, str):
        return None
    snapshot = os.path.dirname(config)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
    return snapshot if any(os.path.isfile(os.path.join(snapshot, w)) for w in weights) else None


# ---------------------------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------------------------

def _pick_device(device: str | None):
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise VitvizError(f"unknown device {device!r}: {e}; use cpu, cuda or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VitvizError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise VitvizError("--device mps was asked for but MPS is not available; use --device cpu")
    return dev


def load_model(name: str, *, weights=None, pretrained: bool = True, num_classes: int | None = None,
               image_size=None, device: str | None = "cpu"):
    """Load a model by alias, timm name, transformers id or local directory.

    Args:
        name: alias (``b16``, ``deit-s-distilled``, ``dinov2-s-reg`` ... see :func:`list_models`),
            a bundled zoo model, any timm model name, or a transformers checkpoint id / directory.
        weights: a weights file (``.safetensors``, ``.pth``/``.pt``/``.bin`` state dict, also
            nested under ``model``/``state_dict`` or saved from ``pytorch_pretrained_vit``),
            loaded with ``weights_only=True``.
        pretrained: ``True``: the cached weights, else downloaded from the Hugging Face Hub on
            first use; ``False`` builds the architecture with untrained weights (no download).
        num_classes: classifier size (inferred from ``weights`` when not given).
        image_size: input size in pixels; position embeddings are interpolated when the model
            was trained at another size.
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` or ``None`` for the best available.

    Returns:
        VisionModel in eval mode on ``device``.

    Raises:
        ModelNotFoundError: unknown name (the message lists the closest names).
        WeightsNotFoundError: pretrained weights are not on this machine and cannot be had;
            its subclass DownloadError when the Hub download failed (``reason``: offline,
            unreachable, not_found, no_file, auth, failed).
        CheckpointError: the weights file cannot be read or does not fit.

    Example:
        >>> m = vitviz.load_model("b16", pretrained=False)
        >>> m.layout
        TokenLayout(num_prefix=1, grid=(14, 14), has_cls=True)
    """
    dev = _pick_device(device)
    if weights is not None and not pretrained:
        raise VitvizError("weights= (--weights) and pretrained=False (--random) exclude each other; pick one")
    if image_size is not None:
        image_size = int(image_size) if not isinstance(image_size, (tuple, list)) else tuple(image_size)
    r = resolve(name, image_size)
    if r.source == "zoo":
        from .bundled import ZOO

        vm = ZOO[r.name].load(weights=weights, pretrained=pretrained)
    elif r.source == "timm":
        vm = _load_timm(r, weights, pretrained, num_classes, image_size)
    else:
        vm = _load_transformers(r, weights, pretrained, num_classes, image_size)
    return vm.to(dev)


def _load_timm(r: Resolved, weights, pretrained, num_classes, image_size):
    from ._vision_model import wrap

    kwargs = {}
    if image_size is not None and not r.exact_size:
        kwargs["img_size"] = image_size
    labels = None
    if weights is not None:
        from ._checkpoint_convert import (
            convert_pytorch_pretrained_vit,
            infer_timm_args,
            is_pytorch_pretrained_vit,
            load_into_timm,
        )
        from ._checkpoint_read import read_state_dict

        sd = read_state_dict(weights)
        if is_pytorch_pretrained_vit(sd):
            sd = convert_pytorch_pretrained_vit(sd)
        inferred = infer_timm_args(sd)
        if num_classes is None and inferred.get("num_classes") is not None:
            num_classes = inferred["num_classes"]
        if image_size is None and inferred.get("img_size") is not None:
            # the checkpoint's own size (e.g. a 384 px fine-tune of a 224 px architecture)
            kwargs["img_size"] = inferred["img_size"]
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = _create_timm(r, kwargs)
        load_into_timm(model, sd, source=str(weights))
    elif pretrained:
        path, sought = timm_weights_location(r.model_id)
        if path is None:  # first use: from the Hub (fails fast, one line, when it cannot)
            path = _hub.timm_download(r.model_id, r.name)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            model = _create_timm(r, kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=path))
        except (RuntimeError, OSError, ValueError) as e:
            raise CheckpointError(f"cached weights {path} for {r.model_id} could not be loaded: {e}; "
                                  "delete the file and download it again") from e
        labels = _imagenet_labels(model)
    else:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = _create_timm(r, kwargs)
    vm = wrap(model, labels=labels, name=r.name)
    size = kwargs.get("img_size")
    if size is not None:
        from ._preprocess import Preprocess, _timm_built_size

        if _timm_built_size(model) is None:  # built for `size` but does not record it (MViTv2, MobileViT)
            vm._preprocessor_factory = lambda: Preprocess.from_timm(model, size=size)
    return vm


def _create_timm(r: Resolved, kwargs: dict, **extra):
    """``timm.create_model(r.model_id, **kwargs, **extra)``, checked against the asked size.

    With ``kwargs["img_size"]``: a model that records the size it was built for
    (``patch_embed.img_size``, its own ``img_size``) must record that size; one whose
    constructor takes no ``img_size`` (DaViT, FastViT, TinyViT, NextViT, PVT v2), or takes it
    without recording it (LeViT, MViTv2, MobileViT, EfficientFormer), is run once on a blank
    input of that size: used at that size when it runs there, refused with the reason when
    it does not (layers built for one resolution).
    """
    import timm

    extra.setdefault("pretrained", False)
    size = kwargs.get("img_size")
    try:
        model = timm.create_model(r.model_id, **kwargs, **extra)
    except TypeError as e:
        if size is None or "img_size" not in str(e):
            raise VitvizError(f"timm could not build {r.model_id}: {e}") from e
        rest = {k: v for k, v in kwargs.items() if k != "img_size"}
        model = timm.create_model(r.model_id, **rest, **extra)
    if size is not None:
        from ._preprocess import _timm_built_size

        hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        built = _timm_built_size(model)
        if built is None:
            _check_runs_at(model, r, hw)
        elif built != hw:
            raise VitvizError(f"{r.name} was built for {built[0]}x{built[1]} px and does not take "
                              f"--image-size {size}; omit --image-size")
    return model


def _check_runs_at(model, r: Resolved, hw: tuple[int, int]) -> None:
    """One forward pass on a blank ``hw`` input (eval mode, no gradients); a model whose layers
    are built for another resolution fails it, and is refused with the reason."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *hw))
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as e:
        raise VitvizError(
            f"{r.name} does not run at --image-size {hw[0] if hw[0] == hw[1] else hw} "
            f"({' '.join(str(e).split())[:120]}): its layers are built for {_native_size(model)}; "
            "omit --image-size") from None


def _native_size(model) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return f"{size[-2]}x{size[-1]} px" if size else "its default size"


def _imagenet_labels(model) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        n = model.num_classes
        return [info.index_to_description(i) for i in range(n)]
    except Exception:  # noqa: BLE001 - label files are optional metadata; a model without them still works
        return None


def _hf_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel

    return AutoModel


def _hf_load(load, r: Resolved, what: str, filename: str, online: bool, *, need_config: bool = False,
             **kwargs):
    """``load(model_id, ...)`` (a transformers ``from_pretrained``) from the cache, else from the Hub.

    Returns ``(result, online)``: ``online`` turns True once the Hub has been asked, so that the
    model's other files (processor, tokenizer) are fetched the same way. The first Hub request
    of a model is one huggingface_hub download of ``config.json``: a missing network, a Hub
    that never answers, a missing or private repo fail there, fast and with one typed line.
    ``need_config``: the config is loaded for an untrained model or a weights file (``--random``,
    ``--weights``), and the messages say that those need it too, instead of suggesting them.
    """
    local_dir = Path(r.model_id).is_dir()
    cache = dict(cache_dir=_hf_cache_dir()) if not local_dir else {}
    if not online:
        try:
            return load(r.model_id, local_files_only=True, **cache, **kwargs), False
        except (OSError, ValueError) as e:
            if local_dir:
                raise _missing_weights(r.name, f"the {what} of {r.model_id} in {r.model_id}",
                                       need_config=need_config) from e
            if _hub.is_offline():
                raise _hub.explain(e, r.model_id, filename, r.name, need_config=need_config) or _missing_weights(
                    r.name, f"the {what} of {r.model_id} in the Hugging Face cache {_hf_cache_dir()}",
                    need_config=need_config) from e
        # the probe: DownloadError when it fails
        _hub.download(r.model_id, "config.json", name=r.name, need_config=need_config)
    try:
        return load(r.model_id, **cache, **kwargs), True
    except (OSError, ValueError) as e:
        err = _hub.explain(e, r.model_id, filename, r.name, need_config=need_config)
        if err is not None:
            raise err from e
        raise WeightsNotFoundError(
            f"the {what} of {r.model_id} could not be loaded from {_hub.endpoint()}: "
            f"{' '.join(str(e).split())[:200]}. {_hub.fixes(r.name, need_config=need_config)}") from e


def _untied(model, missing, sd) -> list:
    """The missing keys that no loaded key fills: a tied parameter (a decoder's output layer
    sharing the word embeddings) is saved once by ``save_pretrained`` / safetensors, under one
    of its names, and filled through the other."""
    state = model.state_dict(keep_vars=True)
    names: dict = {}
    for k, v in state.items():
        names.setdefault(id(v), []).append(k)
    return [k for k in missing if not any(o in sd for o in names.get(id(state.get(k)), ()) if o != k)]


def _load_transformers(r: Resolved, weights, pretrained, num_classes, image_size):
    from transformers import AutoConfig

    from ._vision_model import wrap

    if image_size is not None:
        raise VitvizError(
            "--image-size is supported for timm models; a transformers model takes other sizes when "
            "called with interpolate_pos_encoding=True")
    config, online = _hf_load(AutoConfig.from_pretrained, r, "config", "config.json", False,
                              need_config=weights is not None or not pretrained)
    extra = {}
    if num_classes is not None:
        extra = dict(num_labels=num_classes)
    cls = _hf_class(config)
    if weights is not None or not pretrained:
        for k, v in extra.items():
            setattr(config, k, v)
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
        if weights is not None:
            from ._checkpoint_read import read_state_dict

            sd = read_state_dict(weights)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = _untied(model, missing, sd)
            if missing or unexpected:
                raise CheckpointError(
                    f"{weights} does not fit {r.model_id}: {len(missing)} missing keys "
                    f"({', '.join(missing[:5])}) and {len(unexpected)} unexpected keys "
                    f"({', '.join(unexpected[:5])}); check --model and --num-classes")
    else:
        model, online = _hf_load(cls.from_pretrained, r, "weights", "model.safetensors", online,
                                 ignore_mismatched_sizes=bool(extra), **extra)
    vm = wrap(model, name=r.name)
    _attach_hf_processor(vm, r.model_id, online)
    _attach_hf_tokenizer(vm, r.model_id, model, online)
    return vm


def _hf_file_kwargs(model_id: str, online: bool) -> dict:
    """``from_pretrained`` keywords for a model's processor and tokenizer files.

    From the Hub when the model itself was just downloaded (``online``), else from the cache
    only: a model loaded from the cache never waits for the network for its side files.
    """
    if Path(model_id).is_dir():
        return dict(local_files_only=True)
    return dict(local_files_only=not online, cache_dir=_hf_cache_dir())


def _attach_hf_tokenizer(vm, model_id: str, model, online: bool = False) -> None:
    """Give a captioner (a model that generates text) or a contrastive image-text model (CLIP,
    SigLIP: it has ``get_text_features``) its tokenizer.

    Read from the cache, or downloaded with the model on its first use (``online``). Without
    tokenizer files the model still works: captions show token ids (``vitviz.caption`` says so
    in a note) and text maps take token ids (``vitviz.explain_text`` says so).
    """
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) and not hasattr(model, "get_text_features"):
        return
    try:
        from transformers import AutoTokenizer

        vm.tokenizer = AutoTokenizer.from_pretrained(model_id, **_hf_file_kwargs(model_id, online))
    except (OSError, ValueError, KeyError, ImportError):  # no (usable) tokenizer files
        vm.tokenizer = None


def _attach_hf_processor(vm, model_id: str, online: bool = False) -> None:
    """Use the checkpoint's own image processor settings (cached, or downloaded with the model)."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model_id, **_hf_file_kwargs(model_id, online))
    except (OSError, ValueError, ImportError):
        return
    from ._preprocess import Preprocess

    vm.preprocessor = Preprocess.from_hf_processor(proc)


# ---------------------------------------------------------------------------------------------
# fetch: download ahead of time (`vitviz fetch`)
# ---------------------------------------------------------------------------------------------

def fetch(name: str, *, image_size=None) -> list[str]:
    """Put a model's pretrained files into the local cache now, and say where they are.

    For a login node before jobs on offline compute nodes: what this downloads is exactly
    what :func:`load_model` reads later with ``HF_HUB_OFFLINE=1`` (the same ``HF_HOME``).
    Files already cached are not downloaded again.

    Args:
        name: as :func:`load_model`.
        image_size: picks an alias's model for that size (``b16`` at 384 is ``vit_base_patch16_384``).

    Returns:
        The local files (timm: the weights file; transformers: every file of the cached
        snapshot, config, weights, processor and tokenizer; zoo: the bundled weights).

    Raises:
        ModelNotFoundError, DownloadError, WeightsNotFoundError: as :func:`load_model`.

    Example:
        >>> vitviz.models.fetch("ti16")  # doctest: +ELLIPSIS
        ['.../hub/models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k/snapshots/.../model.safetensors']
    """
    r = resolve(name, image_size)
    if r.source == "zoo":
        from .bundled import ZOO

        path = ZOO[r.name].weights_path()
        if path is None:
            raise WeightsNotFoundError(f"the bundled weights of {name!r} are missing from this installation; "
                                       "reinstall vitviz")
        return [str(path)]
    if r.source == "timm":
        path, _ = timm_weights_location(r.model_id)
        return [path or _hub.timm_download(r.model_id, r.name)]
    if Path(r.model_id).is_dir():
        return [r.model_id]
    load_model(name)  # config, weights, processor, tokenizer
    snapshot = _hf_snapshot(r.model_id)
    if snapshot is None:  # loaded, so this only happens when the cache was changed meanwhile
        raise WeightsNotFoundError(f"{r.model_id} was loaded but is not in the cache {_hf_cache_dir()}")
    return sorted(os.path.join(snapshot, f) for f in os.listdir(snapshot))
