"""Progress output: every tqdm bar of vitviz goes through ``vitviz._util.progress.progress_bar``, which
draws a bar only where stderr is a terminal (or a notebook). Logs, pipes and CI get no carriage
returns and no escape sequences, also from nested bars (`vitviz flow`: the batch bar and attention
flow's bar inside it); one image gets no bar at all.

Three kinds of test: the helper's rule on fake streams (unit); the source holds no other tqdm bar
(structure); the commands as the shell runs them, stderr piped and stderr on a pseudo-terminal
(end to end).
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitviz._util.progress import interactive, progress_bar

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "vitviz" / "assets").glob("*.png"))
ESCAPES = ("\r", "\x1b[")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return self.tty


# ---- the helper's rule -----------------------------------------------------------------------------

def test_a_bar_is_drawn_on_a_terminal_only(monkeypatch):
    tty = _Stream(True)
    monkeypatch.setattr(sys, "stderr", tty)
    with progress_bar(total=3, desc="work", unit="img") as bar:
        assert not bar.disable
        bar.update(3)
    assert "work" in tty.getvalue() and "\r" in tty.getvalue()

    pipe = _Stream(False)
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress_bar(total=3, desc="work", unit="img") as bar:
        assert bar.disable
        bar.update(3)
    assert pipe.getvalue() == ""


def test_disabled_on_request_and_below_min_total(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(True))
    assert progress_bar(total=5, enabled=False).disable
    assert progress_bar([1], min_total=2).disable  # one image: no bar
    assert not progress_bar([1, 2], min_total=2).disable
    assert list(progress_bar([1, 2, 3], enabled=False)) == [1, 2, 3]  # a disabled bar still iterates


def test_interactive_on_odd_streams():
    assert interactive(_Stream(True)) and not interactive(_Stream(False))
    closed = _Stream(True)
    closed.close()
    assert not interactive(closed)  # a closed stream: isatty raises ValueError
    assert not interactive(object())  # no isatty at all


def test_no_tqdm_bar_outside_the_helper():
    """Every bar goes through progress_bar: no module but the helper builds a tqdm object
    (``tqdm.write``, which prints a line above the bars, is fine)."""
    found = []
    for path in sorted((ROOT / "vitviz").rglob("*.py")):
        if path.name == "progress.py" and path.parent.name == "_util":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in ("tqdm", "trange") and not (isinstance(f, ast.Attribute) and f.attr == "write"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


# ---- the commands as the shell runs them ------------------------------------------------------------

def _vitviz(args: list[str], tmp_path: Path, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    code = "import sys\nfrom vitviz.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=stderr,
                          env=env, cwd=tmp_path, timeout=300)


def test_flow_nested_bars_leave_no_escapes_in_a_pipe(tmp_path):
    out = _vitviz(["flow", *map(str, SAMPLES), str(SAMPLES[0]), "--model", "shapes-vit", "--out",
                   str(tmp_path / "o")], tmp_path)
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert not any(e in err for e in ESCAPES), repr(err[:300])
    assert "3 done, 0 skipped" in err and "%|" not in err  # the summary, and no bar


@pytest.mark.parametrize("n", [1, 2])
def test_rollout_progress_in_a_pipe(tmp_path, n):
    out = _vitviz(["rollout", *map(str, (SAMPLES * 2)[:n]), "--model", "shapes-vit", "--out",
                   str(tmp_path / "o")], tmp_path)
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert not any(e in err for e in ESCAPES) and "%|" not in err, repr(err[:300])


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
@pytest.mark.parametrize("n", [1, 2])
def test_on_a_terminal_the_bars_are_drawn(tmp_path, n):
    """The other side of the rule: with stderr on a (pseudo-)terminal, two images get a bar, one
    image none."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        out = _vitviz(["rollout", *map(str, SAMPLES[:n]), "--model", "shapes-vit", "--out", str(tmp_path / "o")],
                      tmp_path, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert out.returncode == 0, err
    assert f"{n} done, 0 skipped" in err
    if n == 1:
        assert "%|" not in err  # one image: no bar
    else:
        assert "%|" in err and "\r" in err  # tqdm's bar, redrawn in place
