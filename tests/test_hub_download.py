"""Pretrained weights from the Hub on first use, `vitviz fetch`, and fast clear failures.

Every test talks to a stand-in Hub on 127.0.0.1 (tests/fake_hub.py) through the real
huggingface_hub client and transformers' own loaders; nothing reaches the network. The
source of truth for "the downloaded model is right" is the same file loaded with
``--weights`` / ``weights=`` (and the reference module's own parameters).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fake_hub import FakeHub, closed_port_url
from helpers import save_tiny_blip
from safetensors.torch import save_file

import vitviz
from vitviz.cli import main
from vitviz.errors import DownloadError
from vitviz.models._loader import fetch, weights_status

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
TI16_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # what timm names for alias ti16
BLIP_REPO = "acme/tiny-blip"


def _point_client_at(monkeypatch, url: str) -> None:
    """HF_ENDPOINT for this process: huggingface_hub read it at import, so set its constants."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_ENDPOINT", url)


@pytest.fixture(scope="module")
def ti16_file(tmp_path_factory):
    """Random ViT-Ti/16 weights (seeded, with a non-zero head) as the Hub's model.safetensors."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("ti16") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    """A tiny BLIP captioner as a Hub repo: config, weights, image processor, tokenizer."""
    return save_tiny_blip(tmp_path_factory.mktemp("blip"), processor=True)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running stand-in Hub, an empty cache, online mode, no token."""
    from huggingface_hub import constants

    server = FakeHub().start()
    _point_client_at(monkeypatch, server.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    yield server
    server.stop()


def _offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _rollout(tmp_path, sub, *extra):
    out = tmp_path / sub
    code = main(["rollout", str(SAMPLES[0]), "--out", str(out), *extra])
    assert code == 0
    return np.load(out / f"{SAMPLES[0].stem}_rollout.npy")


# ---------------------------------------------------------------------------------------------
# timm alias: download, same maps as --weights, then from the cache with the Hub gone
# ---------------------------------------------------------------------------------------------

def test_timm_alias_downloads_on_first_use_and_matches_weights_file(hub, ti16_file, tmp_path, monkeypatch):
    hub.add_repo(TI16_REPO, {"model.safetensors": ti16_file.read_bytes()})
    assert weights_status("ti16")[1] is None

    downloaded = _rollout(tmp_path, "hub", "--model", "ti16")
    asked = [p for m, p in hub.requests if m == "GET"]
    assert asked == [f"/{TI16_REPO}/resolve/main/model.safetensors"]  # one file, fetched once
    cached = weights_status("ti16")[1]
    assert cached is not None and cached.startswith(str(tmp_path / "hub"))
    assert Path(cached).read_bytes() == ti16_file.read_bytes()

    from_file = _rollout(tmp_path, "file", "--model", "ti16", "--weights", str(ti16_file))
    np.testing.assert_array_equal(downloaded, from_file)
    assert downloaded.shape == (14, 14) and np.ptp(downloaded) > 0

    # the cache is used without any request, and works with the Hub gone
    n = len(hub.requests)
    again = _rollout(tmp_path, "again", "--model", "ti16")
    assert len(hub.requests) == n
    hub.stop()
    np.testing.assert_array_equal(_rollout(tmp_path, "gone", "--model", "ti16"), downloaded)
    _offline(monkeypatch)
    np.testing.assert_array_equal(_rollout(tmp_path, "offline", "--model", "ti16"), again)


def test_timm_falls_back_to_pytorch_model_bin(hub, ti16_file, tmp_path):
    """timm's order: model.safetensors, else pytorch_model.bin (read with weights_only=True)."""
    from safetensors.torch import load_file

    sd = load_file(str(ti16_file))
    buf = tmp_path / "pytorch_model.bin"
    torch.save(sd, buf)
    hub.add_repo(TI16_REPO, {"pytorch_model.bin": buf.read_bytes()})
    m = vitviz.load_model("ti16")
    assert [p.rsplit("/", 1)[-1] for meth, p in hub.requests if meth == "GET"] == ["pytorch_model.bin"]
    for k, v in sd.items():
        assert torch.equal(m.module.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------
# transformers id: config, weights, processor and tokenizer through transformers' loaders
# ---------------------------------------------------------------------------------------------

def test_transformers_captioner_downloads_with_tokenizer_and_processor(hub, blip_folder, tmp_path, monkeypatch):
    from vitviz.explain.captioning import caption

    hub.add_folder(BLIP_REPO, blip_folder)
    m = vitviz.load_model(BLIP_REPO)
    assert type(m.tokenizer).__name__ == "BertTokenizer"  # tokenizer files came with it
    assert m.preprocessor.size == (32, 32)  # from the downloaded preprocessor_config.json
    got = {p.rsplit("/", 1)[-1] for meth, p in hub.requests if meth == "GET" and "/resolve/" in p}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= got

    # same model as weights= on the same file
    w = vitviz.load_model(BLIP_REPO, weights=str(blip_folder / "model.safetensors"))
    for (k, a), b in zip(m.module.state_dict().items(), w.module.state_dict().values()):
        assert torch.equal(a, b), k
    cap_hub = caption(m, SAMPLES[0], max_new_tokens=3)
    cap_file = caption(w, SAMPLES[0], max_new_tokens=3)
    assert cap_hub.text == cap_file.text and cap_hub.tokens == cap_file.tokens
    assert torch.equal(cap_hub.cross.tensor, cap_file.cross.tensor)
    assert torch.equal(vitviz.word_grids(cap_hub), vitviz.word_grids(cap_file))

    # from the cache, tokenizer included, with the Hub gone and offline
    hub.stop()
    _offline(monkeypatch)
    again = vitviz.load_model(BLIP_REPO)
    assert type(again.tokenizer).__name__ == "BertTokenizer" and again.preprocessor.size == (32, 32)
    assert torch.equal(caption(again, SAMPLES[0], max_new_tokens=3).cross.tensor, cap_hub.cross.tensor)


# ---------------------------------------------------------------------------------------------
# vitviz fetch and vitviz models
# ---------------------------------------------------------------------------------------------

def test_fetch_fills_the_cache_for_offline_runs(hub, ti16_file, blip_folder, tmp_path, capsys, monkeypatch):
    hub.add_repo(TI16_REPO, {"model.safetensors": ti16_file.read_bytes()})
    hub.add_folder(BLIP_REPO, blip_folder)
    assert main(["fetch", "ti16", BLIP_REPO]) == 0
    out = capsys.readouterr().out.splitlines()
    paths = {line.split(": ", 1)[0]: [] for line in out}
    for line in out:
        name, path = line.split(": ", 1)
        paths[name].append(path)
        assert Path(path).is_file() and path.startswith(str(tmp_path / "hub")), line
    assert [Path(p).name for p in paths["ti16"]] == ["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        Path(p).name for p in paths[BLIP_REPO]}
    # `vitviz models` shows it cached; a second fetch downloads nothing
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ti16 "))
    assert " cached " in line
    n = len(hub.requests)
    assert fetch("ti16") == paths["ti16"] and len(hub.requests) == n

    hub.stop()
    _offline(monkeypatch)
    assert vitviz.load_model("ti16").labels is not None
    assert vitviz.load_model(BLIP_REPO).tokenizer is not None


def test_fetch_reports_each_failure_and_exits_2(hub, ti16_file, capsys):
    hub.add_repo(TI16_REPO, {"model.safetensors": ti16_file.read_bytes()})
    assert main(["fetch", "acme/nothing-here", "ti16"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("ti16: ")  # the good one was still fetched
    assert "acme/nothing-here" in captured.err and "1 fetched, 1 failed" in captured.err


def test_offline_without_cache_makes_no_request(hub, ti16_file, monkeypatch):
    hub.add_repo(TI16_REPO, {"model.safetensors": ti16_file.read_bytes()})
    _offline(monkeypatch)
    for name, repo in [("ti16", TI16_REPO), (BLIP_REPO, BLIP_REPO)]:
        with pytest.raises(DownloadError) as e:
            vitviz.load_model(name)
        assert e.value.reason == "offline" and repo in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert hub.requests == []


# ---------------------------------------------------------------------------------------------
# bad input: no network, a Hub that never answers, 404, 401/403, interrupted transfers
# ---------------------------------------------------------------------------------------------

def test_no_network_fails_at_once_with_the_fixes(hub, monkeypatch, capsys, tmp_path):
    _point_client_at(monkeypatch, closed_port_url())
    t0 = time.monotonic()
    code = main(["rollout", str(SAMPLES[0]), "--model", "ti16", "--out", str(tmp_path / "o")])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    for part in (TI16_REPO, "model.safetensors", "cannot connect", str(tmp_path / "hub"), "--weights FILE",
                 "vitviz fetch ti16", "HF_HUB_OFFLINE=1", "--random"):
        assert part in err, part
    assert elapsed < 5


def test_hanging_hub_exits_2_within_the_timeout(tmp_path):
    """A Hub (or proxy) that accepts connections and never answers: the real CLI, the real
    environment variables (HF_ENDPOINT, HF_HOME, HF_HUB_ETAG_TIMEOUT), exit 2, one line."""
    with FakeHub(hang_s=20) as server:
        server.hang = True
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2")
        env.pop("HF_HUB_CACHE", None)
        env.pop("HF_HUB_OFFLINE", None)
        code = ("import sys, time; from vitviz.cli import main; import timm, transformers; t0 = time.monotonic(); "
                "rc = main(sys.argv[1:]); print(f'elapsed {time.monotonic() - t0:.2f}'); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code, "rollout", str(SAMPLES[0]), "--model", "ti16",
                               "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                              timeout=120)
        assert server.requests, "the client never reached the stand-in Hub"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert TI16_REPO in proc.stderr and "model.safetensors" in proc.stderr
    assert "no answer within 2 s" in proc.stderr and str(tmp_path / "hf" / "hub") in proc.stderr
    elapsed = float(proc.stdout.split("elapsed ")[1])
    assert 1.5 < elapsed < 8  # one metadata call bounded by HF_HUB_ETAG_TIMEOUT, no retries


def test_missing_repo_and_missing_file_say_which(hub, ti16_file):
    with pytest.raises(DownloadError) as e:
        vitviz.load_model("ti16")
    assert e.value.reason == "not_found" and f"no repo {TI16_REPO}" in str(e.value) and "404" in str(e.value)
    hub.add_repo(TI16_REPO, {"README.md": b"no weights here"})
    with pytest.raises(DownloadError) as e:
        vitviz.load_model("ti16")
    msg = str(e.value)
    assert e.value.reason == "no_file" and "has no file pytorch_model.bin" in msg and "404" in msg
    with pytest.raises(DownloadError) as e:
        vitviz.load_model("acme/missing-model")
    assert e.value.reason == "not_found" and "acme/missing-model" in str(e.value)


def test_private_repo_says_log_in_and_hf_token_opens_it(hub, ti16_file, monkeypatch):
    hub.add_repo(TI16_REPO, {"model.safetensors": ti16_file.read_bytes()}, access="private")
    with pytest.raises(DownloadError) as e:
        vitviz.load_model("ti16")
    msg = str(e.value)
    assert e.value.reason == "auth" and "401" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    monkeypatch.setenv("HF_TOKEN", hub.token)  # honoured as huggingface_hub does
    m = vitviz.load_model("ti16")
    assert m.module.head.out_features == 1000


def test_gated_repo_says_accept_and_log_in(hub, blip_folder):
    hub.add_folder(BLIP_REPO, blip_folder, access="gated")
    with pytest.raises(DownloadError) as e:
        vitviz.load_model(BLIP_REPO)
    msg = str(e.value)
    assert e.value.reason == "auth" and "gated" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert f"{hub.url}/{BLIP_REPO}" in msg


def _complete_files(cache: Path) -> list:
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".incomplete")
            and "blobs" in p.parts]


def test_broken_off_transfer_leaves_nothing_taken_for_weights(hub, ti16_file, monkeypatch, tmp_path):
    """The transfer breaks off half-way and the resume is refused: a typed error, no blob
    in the cache, `vitviz models` says not cached, and the next run downloads it whole."""
    data = ti16_file.read_bytes()
    hub.add_repo(TI16_REPO, {"model.safetensors": data})
    hub.break_off["model.safetensors"] = 1
    hub.fail_resume = True
    with pytest.raises(DownloadError) as e:
        vitviz.load_model("ti16")
    assert e.value.reason == "failed" and "*.incomplete" in str(e.value) and "500" in str(e.value), str(e.value)
    assert _complete_files(tmp_path / "hub") == []
    assert weights_status("ti16")[1] is None
    hub.fail_resume = False
    m = vitviz.load_model("ti16")
    assert Path(weights_status("ti16")[1]).read_bytes() == data
    assert m.module.head.out_features == 1000


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0


def test_killed_download_is_never_mistaken_for_complete(hub, ti16_file, monkeypatch, tmp_path):
    """`vitviz fetch` killed (SIGKILL) half-way through: the partial bytes stay only in an
    ``*.incomplete`` file; neither the cache lookup nor an offline run takes it for the
    weights; the next online run downloads the file whole."""
    data = ti16_file.read_bytes()
    hub.add_repo(TI16_REPO, {"model.safetensors": data})
    hub.stall["model.safetensors"] = 1
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_DOWNLOAD_TIMEOUT="60")
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.Popen([sys.executable, "-m", "vitviz.cli", "fetch", "ti16"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in (tmp_path / "hub").rglob("*.incomplete") if _size(p) > 0]
            if partial:
                break
            time.sleep(0.1)
        assert partial, f"no partial download appeared: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert _complete_files(tmp_path / "hub") == [] and not list((tmp_path / "hub").rglob("snapshots/*/*"))
    assert weights_status("ti16")[1] is None
    with monkeypatch.context() as mp:
        _offline(mp)
        with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
            vitviz.load_model("ti16")
    m = vitviz.load_model("ti16")
    assert Path(weights_status("ti16")[1]).read_bytes() == data
    from safetensors.torch import load_file

    for k, v in load_file(str(ti16_file)).items():
        assert torch.equal(m.module.state_dict()[k], v), k


def test_env_hf_home_and_offline_in_a_fresh_process(hub, ti16_file, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as the libraries read them: fetch into HF_HOME/hub here, then
    a new process with only those variables (and a dead endpoint) loads from it."""
    hub.add_repo(TI16_REPO, {"model.safetensors": ti16_file.read_bytes()})
    assert fetch("ti16")
    hub.stop()
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", HF_ENDPOINT=closed_port_url())
    env.pop("HF_HUB_CACHE", None)  # tmp_path/hub is HF_HOME/hub, where the fixture cached it
    proc = subprocess.run([sys.executable, "-m", "vitviz.cli", "rollout", str(SAMPLES[0]), "--model", "ti16",
                           "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / f"{SAMPLES[0].stem}_rollout.npy").is_file()

