"""Pretrained weights from the Hugging Face Hub: downloaded on first use, cached, fast clear failures.

Every transfer goes through ``huggingface_hub`` (directly, or inside transformers' own
loaders), so vitviz behaves as those libraries do: the standard cache (``HF_HOME``,
``HF_HUB_CACHE``), their progress bars, ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``,
``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT``, and the client's temp-file handling (a
blob is written to a ``*.incomplete`` file and renamed only when complete, so a broken-off
download is never mistaken for a finished one; the next run downloads it again). The settings are
read at call time from ``huggingface_hub.constants``.

What vitviz adds: cached files are used first without any network round trip; only the
first request of a model waits for the Hub (one metadata call bounded by
``HF_HUB_ETAG_TIMEOUT``, 10 s by default, no retries), so a missing network or a Hub that
never answers fails within seconds; and every failure becomes one :class:`DownloadError`
line naming the repo, the file, the endpoint and the cache, and the fixes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import DownloadError, WeightsNotFoundError

# timm's order when a pretrained config names no file (timm.models._hub.load_state_dict_from_hf)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def cache_dir() -> str:
    """The Hugging Face hub cache in use now.

    Returns:
        Its folder: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``.
    """
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def endpoint() -> str:
    """The Hub endpoint in use now (``HF_ENDPOINT``, else https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids network access."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def fixes(name: str, *, need_config: bool = False) -> str:
    """The ways out, in one sentence, for a model whose weights cannot be had.

    Args:
        name: what the user asked for.
        need_config: the model's ``config.json`` (its architecture) is what is missing, which
            ``--weights`` and ``--random`` need too: those two are no way out then.
    """
    if need_config:
        return (f"--random and --weights build the architecture from the model's config.json, so they need "
                f"it too. Fix: run `vitviz fetch {name}` on a machine with network access and use its cache "
                "here (same HF_HOME) with HF_HUB_OFFLINE=1; or pass a local model directory holding its "
                "config.json as --model")
    return (f"Fix: pass --weights FILE; or run `vitviz fetch {name}` on a machine with network access "
            "and use its cache here (same HF_HOME) with HF_HUB_OFFLINE=1; or use --random for "
            "untrained weights")


def _or_else(need_config: bool) -> str:
    """The other ways out at the end of a refusal by the Hub."""
    if need_config:
        return "or pass a local model directory holding its config.json as --model"
    return "or pass --weights FILE, or use --random"


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


_NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
                   "TimeoutException", "ProxyError", "NetworkError")


def _is_network(e: BaseException) -> bool:
    """A connection that could not be made or an answer that did not come (httpx / socket)."""
    return (type(e).__name__ in _NETWORK_ERRORS or isinstance(e, (ConnectionRefusedError, TimeoutError))
            or (isinstance(e, ConnectionError) and type(e).__name__ != "OfflineModeIsEnabled"))


def _network_reason(e: BaseException) -> str:
    """Why the Hub could not be reached, in a few words (timeouts say which setting bounds them)."""
    from huggingface_hub import constants

    for c in _chain(e):
        kind = type(c).__name__
        if "Timeout" in kind or isinstance(c, TimeoutError):
            return (f"no answer within {constants.HF_HUB_ETAG_TIMEOUT} s "
                    "(HF_HUB_ETAG_TIMEOUT; a proxy or Hub that does not respond)")
        if "Connect" in kind or isinstance(c, ConnectionError):
            if type(c).__name__ == "OfflineModeIsEnabled":
                continue
            return f"cannot connect: {_one_line(c, 100)}"
    return _one_line(e.__cause__ or e, 100)


def explain(e: BaseException, repo_id: str, filename: str, name: str,
            *, revision: str | None = None, need_config: bool = False) -> DownloadError | None:
    """A :class:`DownloadError` for a failed Hub request, or None when ``e`` is no Hub failure.

    Walks the exception chain, so transformers' ``OSError`` wrappers are explained by the
    ``huggingface_hub`` error inside them.
    """
    from huggingface_hub import errors as hf

    where = f"{repo_id}/{filename}" if filename else repo_id
    cache = cache_dir()
    for c in _chain(e):
        if isinstance(c, hf.LocalEntryNotFoundError) or isinstance(c, hf.OfflineModeIsEnabled):
            if is_offline() or any(isinstance(x, hf.OfflineModeIsEnabled) for x in _chain(c)):
                return _offline(name, repo_id, filename, need_config=need_config)
            return DownloadError(
                f"could not download {where} for {name!r} from {endpoint()}: {_network_reason(c)}; "
                f"it is not in the Hugging Face cache {cache}. {fixes(name, need_config=need_config)}",
                reason="unreachable", repo_id=repo_id, filename=filename)
        if isinstance(c, hf.GatedRepoError):
            return DownloadError(
                f"{repo_id} is a gated repo on {endpoint()} (HTTP {_status(c)}) and this machine is not "
                f"allowed to read {filename or 'it'}: accept its terms at {endpoint()}/{repo_id}, then log in "
                f"with `hf auth login` or set HF_TOKEN; {_or_else(need_config)}",
                reason="auth", repo_id=repo_id, filename=filename)
        if isinstance(c, hf.RepositoryNotFoundError):
            code = _status(c)
            if code in (401, 403):
                return DownloadError(
                    f"{endpoint()} refused {where} (HTTP {code}): the repo is private or gated, or does "
                    f"not exist. Log in with `hf auth login` or set HF_TOKEN to a token that can read "
                    f"{repo_id}; check the name; {_or_else(need_config)}",
                    reason="auth", repo_id=repo_id, filename=filename)
            return DownloadError(
                f"no repo {repo_id} on {endpoint()} (HTTP {code}, needed for {name!r}): check the name "
                "(`vitviz models` lists the aliases); a private repo needs `hf auth login` or HF_TOKEN",
                reason="not_found", repo_id=repo_id, filename=filename)
        if isinstance(c, hf.RevisionNotFoundError):
            return DownloadError(
                f"{repo_id} on {endpoint()} has no revision {revision or 'main'!r} (HTTP {_status(c)})",
                reason="not_found", repo_id=repo_id, filename=filename)
        if isinstance(c, hf.EntryNotFoundError):  # remote: the local one was handled above
            return DownloadError(
                f"{repo_id} on {endpoint()} has no file {filename} (HTTP {_status(c) or 404}, needed "
                f"for {name!r}); "
                + ("it is no transformers model; pass a local model directory holding its config.json as --model"
                   if need_config else "pass --weights FILE with the checkpoint, or use --random"),
                reason="no_file", repo_id=repo_id, filename=filename)
        if isinstance(c, hf.HfHubHTTPError) and _status(c) in (401, 403):
            return DownloadError(
                f"{endpoint()} refused {where} (HTTP {_status(c)}): log in with `hf auth login` or set "
                f"HF_TOKEN to a token that can read {repo_id}; {_or_else(need_config)}",
                reason="auth", repo_id=repo_id, filename=filename)
    if any(_is_network(c) for c in _chain(e)):
        return DownloadError(
            f"could not download {where} for {name!r} from {endpoint()}: {_network_reason(e)}; "
            f"it is not in the Hugging Face cache {cache}. {fixes(name, need_config=need_config)}",
            reason="unreachable", repo_id=repo_id, filename=filename)
    hub_failure = any(type(c).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpx2",
                                                             "urllib", "socket", "ssl")
                      or isinstance(c, (ConnectionError, TimeoutError))
                      or "Consistency check failed" in str(c) for c in _chain(e))
    if not hub_failure:
        return None
    return DownloadError(
        f"download of {where} from {endpoint()} failed: {_one_line(e)}. Nothing partial was kept as "
        f"weights (huggingface_hub writes *.incomplete files in {cache} and moves them into place "
        f"only when complete): run the command again; {fixes(name, need_config=need_config)}",
        reason="failed", repo_id=repo_id, filename=filename)


def _offline(name: str, repo_id: str, filename: str, *, need_config: bool = False) -> DownloadError:
    where = f"{repo_id} ({filename})" if filename else repo_id
    what = f"config.json (the architecture) of {name!r}" if need_config else f"pretrained weights for {name!r}"
    return DownloadError(
        f"no {what} on this machine (looked for {where} in the Hugging Face "
        f"cache {cache_dir()}) and HF_HUB_OFFLINE is set, so nothing is downloaded. "
        f"{fixes(name, need_config=need_config)}; "
        "or unset HF_HUB_OFFLINE on a machine with network access",
        reason="offline", repo_id=repo_id, filename=filename)


def _probe(repo_id: str, filename: str, *, name: str, revision: str | None = None,
           need_config: bool = False) -> None:
    """One metadata request (``HEAD``), bounded by ``HF_HUB_ETAG_TIMEOUT``, without retries.

    ``hf_hub_download`` retries a failed metadata call when nothing is cached (huggingface_hub
    2.x: up to 6 attempts with a 60 s timeout and 23 s of back-off), so a missing network or
    a Hub that never answers would keep the user waiting for minutes. This call decides
    first: any failure becomes a :class:`DownloadError` at once.
    """
    import inspect

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision)
    kwargs = dict(timeout=constants.HF_HUB_ETAG_TIMEOUT)
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False
    try:
        get_hf_file_metadata(url, **kwargs)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one typed line
        raise (explain(e, repo_id, filename, name, revision=revision, need_config=need_config) or DownloadError(
            f"could not download {repo_id}/{filename} for {name!r} from {endpoint()}: {_one_line(e, 100)}; "
            f"it is not in the Hugging Face cache {cache_dir()}. {fixes(name, need_config=need_config)}",
            reason="unreachable", repo_id=repo_id, filename=filename)) from e


def download(repo_id: str, filename: str, *, name: str, revision: str | None = None,
             need_config: bool = False) -> str:
    """One file of a Hub repo into the standard cache (huggingface_hub, with its progress bar).

    Args:
        repo_id: ``org/name`` on the Hub.
        filename: path inside the repo.
        name: what the user asked for (for messages).
        revision: branch, tag or commit; None for ``main``.
        need_config: the file is a model's ``config.json`` asked for to build an untrained
            model or one from a weights file (the messages then say that those need it too).

    Returns:
        The local path of the file (inside the cache's ``snapshots/``).

    Raises:
        DownloadError: offline, unreachable, no such repo/file, access refused, transfer broken off.
    """
    from huggingface_hub import constants, hf_hub_download

    from .._version import __version__

    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(), revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return found
        raise _offline(name, repo_id, filename, need_config=need_config)
    _probe(repo_id, filename, name=name, revision=revision, need_config=need_config)
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir(),
                               etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                               library_name="vitviz", library_version=__version__)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one typed line
        err = explain(e, repo_id, filename, name, revision=revision, need_config=need_config)
        if err is None:
            raise
        raise err from e


def timm_download(model_id: str, name: str) -> str:
    """Download the pretrained weights of a timm model (its ``hf_hub_id``) and return the file.

    Tries the file the pretrained config names, else ``model.safetensors`` then
    ``pytorch_model.bin`` (timm's own order). Weights that timm knows only by URL (19 legacy
    CNNs in timm 1.0.31, no ViT) are refused with the way out (``--weights FILE``).
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_id)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsNotFoundError(
            f"timm has no pretrained weights for {model_id}; pass --weights FILE or use --random")
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files: Sequence[str] = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        if is_offline():
            raise _offline(name, repo, " or ".join(files))
        for i, filename in enumerate(files):
            try:
                return download(repo, filename, name=name, revision=revision or None)
            except DownloadError as e:
                if e.reason != "no_file" or i == len(files) - 1:
                    raise
    raise WeightsNotFoundError(
        f"timm knows the weights of {model_id} only by URL ({cfg.url}), and vitviz downloads from the "
        f"Hugging Face Hub only: download that file and pass --weights FILE, or use --random")
