"""Every Python and shell example of README.md and docs/ runs, so no example can drift from the code.

Each page's fenced blocks are extracted and run in a fresh folder that holds the sample images at
``vitviz/assets/`` (as the root of a clone does), in the order they appear:

* ``python`` blocks run in one namespace per page (a later block uses what an earlier one made);
* ``bash`` / ``sh`` / ``shell`` blocks are ``vitviz`` commands, one per line (``console`` blocks:
  the lines after ``$ ``), run in-process through ``vitviz.cli.main`` with their ``NAME=value``
  prefixes in the environment and their globs expanded; a command must exit with 0, or with the
  status its comment names (``# exit status 1``).

Blocks that need a download, a GPU, a cluster or another tool are on ``SKIP``, keyed by page and
first line, each with its reason. A test checks that every entry names a block that exists and
that every Python or shell block is run or on the list; blocks in other languages must not hold
commands or code. The tutorial notebook (``docs/tutorials/first_map.py``, percent format) runs
cell by cell with its inline displays, and ``docs/figures.py`` draws every figure into a
temporary folder. The site itself is built strict by ``make docs``.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import io
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md"))

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
OTHER = {"text", "yaml", "toml", "json", "html"}  # shown, not run: must not hold commands or code

# (page, first line of the block) -> why it does not run in the test suite
SKIP: dict[tuple[str, str], str] = {
    ("README.md", "make demo    # creates .venv, installs vitviz, runs the bundled models offline, writes "
                  "demo-output/index.html"):
        "builds the virtual environment and runs the whole suite; CI runs `make test`, and `vitviz demo` "
        "is tested by tests/test_cli.py and tests/test_zoo_models.py",
    ("README.md", "pip install -e '.[all]'     # the core, attention flow (OR-tools) and open_clip models"):
        "installs packages from the package index (make install does it)",
    ("docs/index.md", "pip install -e '.[all]'"):
        "installs packages from the package index (make install does it)",
    ("docs/how-to/install.md", "pip install -e '.[all]'      # the core and every extra: what most users want"):
        "installs packages from the package index (make install does it)",
    ("docs/how-to/install.md", "$ vitviz flow cat.jpg --model b16"):
        "shows the error of a venv without the flow extra (make test installs it); tests/test_extras.py "
        "checks the message",
    ("docs/reference/exit-status.md", "$ vitviz rollout cat.jpg --model b16"):
        "needs a machine without network access and without ViT-B/16 in its cache; tests/test_hub_download.py "
        "checks the message against a stand-in Hub",
    ("docs/how-to/offline.md", "HF_HOME=/shared/hf vitviz fetch b16 vit-gpt2                              "
                               "# login node: prints the cached files"):
        "downloads ViT-B/16 and ViT-GPT2 from the Hugging Face Hub; tests/test_hub_download.py runs fetch "
        "against a stand-in Hub",
    ("docs/reference/models.md", "python -m tools.train.train vit"):
        "trains the bundled models (about 45 minutes); tests/test_zoo_train.py runs the training steps "
        "on a few scenes",
    ("docs/tutorials/gallery.md", "#!/bin/bash"):
        "a Slurm array job: needs a cluster and downloads ViT-B/16; the same shards run on one machine in "
        "the block above it",
}


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    body: str

    @property
    def first(self) -> str:
        return next((ln.strip() for ln in self.body.splitlines() if ln.strip()), "")

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (fences inside lists included)."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != fence:
            line = lines[j]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            j += 1
        out.append(Block(page, i + 1, lang, "\n".join(body)))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks_of(page)]


def _commands(block: Block) -> list[str]:
    """The command lines of a shell block (continuations joined; console: the ``$`` lines)."""
    lines, cur = [], ""
    for raw in block.body.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ ") and not cur:
                continue
            line = line.removeprefix("$ ")
        if not cur and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        lines.append(cur + line)
        cur = ""
    return lines


def _argv(line: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def runnable(block: Block) -> bool:
    """A Python block, or a shell block whose every line is a `vitviz` command."""
    if block.lang in PYTHON:
        return True
    if block.lang in SHELL:
        cmds = _commands(block)
        return bool(cmds) and all(_argv(c)[1][:1] == ["vitviz"] for c in cmds)
    return False


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder laid out like the root of a clone (the sample images at vitviz/assets/), as cwd."""
    shutil.copytree(ROOT / "vitviz" / "assets", tmp_path / "vitviz" / "assets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an example that would download fails here instead
    import matplotlib

    matplotlib.use("Agg")
    return tmp_path


def _run_shell(block: Block, monkeypatch) -> None:
    from vitviz.cli import main

    for line in _commands(block):
        env, words = _argv(line)
        expected = re.search(r"#.*\bexit status (\d+)", line)
        expected = int(expected.group(1)) if expected else 0
        argv = []
        for word in words[1:]:
            hits = sorted(glob.glob(word)) if re.search(r"[*?\[]", word) else []
            argv += hits or [word]
        with monkeypatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            try:
                status = main(argv)
            except SystemExit as e:  # argparse
                status = e.code
        assert status == expected, f"{block.where}: `{line}` exited with {status}, the page says {expected}"


def _run_page(page: str, monkeypatch) -> int:
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    try:
        for block in blocks_of(page):
            if (page, block.first) in SKIP or not (block.lang in PYTHON or block.lang in SHELL):
                continue
            assert runnable(block), f"{block.where}: a shell block that is not `vitviz` commands; " \
                                    "add it to SKIP with the reason"
            if block.lang in PYTHON:
                exec(compile(block.body, block.where, "exec"), namespace)
            else:
                _run_shell(block, monkeypatch)
            ran += 1
    finally:
        plt.close("all")
    return ran


RUN_PAGES = [p for p in PAGES if any(runnable(b) and (p, b.first) not in SKIP for b in blocks_of(p))]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_examples_run(page, workdir, monkeypatch):
    assert _run_page(page, monkeypatch) > 0


def test_skip_list_names_blocks_that_exist():
    blocks = all_blocks()
    for (page, first), reason in SKIP.items():
        matches = [b for b in blocks if b.page == page and b.first == first]
        assert len(matches) == 1, f"SKIP names ({page}, {first!r}), which matches {len(matches)} blocks"
        assert matches[0].lang in PYTHON | SHELL, f"SKIP names a {matches[0].lang or 'plain'} block at " \
                                                  f"{matches[0].where}: only examples are run or skipped"
        assert len(reason) > 20, f"say why {page}: {first!r} does not run"


def test_no_block_is_left_out_silently():
    """Each block is run, on the skip list, or in a language that is not run and holds no commands."""
    code_like = re.compile(r"^(\$ |>>> |vitviz |python |pip |make |import |from \w+ import )")
    problems = []
    for b in all_blocks():
        if b.lang in PYTHON | SHELL:
            if (b.page, b.first) not in SKIP and not runnable(b):
                problems.append(f"{b.where}: a {b.lang} block that cannot run in-process: skip it with the reason")
        elif b.lang in OTHER or b.lang == "":
            lines = [ln.strip() for ln in b.body.splitlines() if code_like.match(ln.strip())]
            if lines:
                problems.append(f"{b.where}: a {b.lang or 'plain'} block holds code or commands ({lines[0]!r}); "
                                "fence it as python / bash / console so that it runs, or skip it")
        else:
            problems.append(f"{b.where}: unknown fence language {b.lang!r}")
    assert not problems, "\n".join(problems)
    assert len(RUN_PAGES) >= 15


def _cells(path: Path) -> list[str]:
    """The code cells of a percent-format notebook."""
    cells, cur, kind = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# %%"):
            if kind == "code":
                cells.append("\n".join(cur))
            kind = "markdown" if "[markdown]" in line else "code"
            cur = []
        elif kind is not None:
            cur.append(line)
    if kind == "code":
        cells.append("\n".join(cur))
    return [c for c in cells if c.strip()]


def _display(value) -> tuple[str, object] | None:
    """What a notebook shows for a cell's last expression: its HTML, PNG or a figure's PNG."""
    from matplotlib.figure import Figure

    if value is None:
        return None
    if isinstance(value, Figure):
        buf = io.BytesIO()
        value.savefig(buf, format="png")
        return "figure", buf.getvalue()
    if hasattr(value, "_repr_html_"):
        return "html", value._repr_html_()
    if hasattr(value, "_repr_png_"):
        return "png", value._repr_png_()
    return "text", repr(value)


def test_tutorial_notebook_runs_top_to_bottom(workdir):
    notebook = DOCS / "tutorials" / "first_map.py"
    namespace: dict = {"__name__": "__main__"}
    shown = []
    for i, cell in enumerate(_cells(notebook)):
        tree = ast.parse(cell)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, f"{notebook.name}[cell {i}]", "exec"), namespace)
        if last is not None:
            shown.append(_display(eval(compile(ast.Expression(last.value), f"{notebook.name}[cell {i}]", "eval"),
                                       namespace)))
    kinds = [s[0] for s in shown if s]
    assert "png" in kinds, "the AttentionMaps display"
    assert "figure" in kinds
    html = [data for kind, data in (s for s in shown if s) if kind == "html"]
    assert html and "<iframe" in html[-1], "the explorer shows itself in an iframe"
    assert all(data for _, data in (s for s in shown if s))
    import matplotlib.pyplot as plt

    plt.close("all")


def test_figures_script_draws_every_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("docs_figures", DOCS / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    written = figures.draw(tmp_path / "figures")
    names = {p.name for p in written}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in written)
    # every figure a page shows is one the script draws
    shown = set()
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        shown |= {a or b for a, b in re.findall(r"\(\.\./figures/([\w.-]+)\)|\(figures/([\w.-]+)\)", text)}
    assert shown and shown <= names, f"pages show figures the script does not draw: {sorted(shown - names)}"
    assert not list(DOCS.rglob("*.png")), "figures come from docs/figures.py, not from files placed in docs/"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    first = blocks_of("README.md")[0]
    assert [c.split()[:2] for c in _commands(first)] == [["make", "demo"], ["make", "test"]]
    assert text.index(first.body) < text.index("\n## ")


def test_readme_links_point_at_files():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_command_pages_name_every_option():
    hooks = _hooks()
    parser, subs = hooks.command_parsers()
    assert set(subs) >= {"rollout", "cls", "relevance", "text", "explore", "gallery", "methods"}
    index = hooks.index_page(parser, subs)
    for name, sub in subs.items():
        assert f"({name}.md)" in index
        page = hooks.command_page(name, sub)
        for action in sub._actions:
            for option in action.option_strings:
                if action.help != "==SUPPRESS==":
                    assert f"`{option}" in page or f", {option}" in page, f"vitviz {name}: {option}"


def test_api_pages_cover_every_public_name():
    """The API pages' markers and entries give every name of vitviz.__all__ its entry (the build
    checks the same on the built site)."""
    import vitviz

    hooks = _hooks()
    text = ""
    for page in (DOCS / "reference" / "api").glob("*.md"):
        body = page.read_text(encoding="utf-8")
        text += hooks.API_MARKER.sub(lambda m: hooks.api_block(m.group(1)), body) + "\n"
    missing = [n for n in vitviz.__all__ if f"::: vitviz.{n}\n" not in text + "\n"
               and f"{{#vitviz.{n}}}" not in text]
    assert not missing, f"no reference entry for {missing}"
    assert "<!-- api-index -->" in (DOCS / "reference" / "api" / "index.md").read_text(encoding="utf-8")
