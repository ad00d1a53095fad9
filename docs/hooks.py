"""MkDocs hooks of the vitviz site (``hooks:`` in mkdocs.yml); nothing here is published.

* The command reference is generated from the argparse parsers (``vitviz.cli.build_parser``):
  ``reference/cli/index.md`` and one page per command, added to the nav under "Commands", so a
  new option or command is documented by the build that follows it.
* The figures are drawn from the bundled models by ``docs/figures.py`` into a temporary folder and
  published under ``figures/``; no figure is a hand-placed file.
* An API page holds a marker line ``<!-- api vitviz.PACKAGE -->`` that becomes the package's
  reference: first each of its names that ``vitviz`` re-exports (``::: vitviz.NAME``), then the
  package with the rest of its public names, taken from its ``__all__`` at build time.
* After the build, every name in ``vitviz.__all__`` must have a reference entry (an anchor
  ``vitviz.<name>`` in some page) and a docstring; a missing one is a warning, which fails
  ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the vitviz of this clone

log = get_plugin_logger("vitviz-docs")  # its warnings count in strict mode
CLI_DIR = "reference/cli"
_tmp: tempfile.TemporaryDirectory | None = None


# ---------------------------------------------------------------------------------------------
# the command reference


def command_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``vitviz`` parser and its subcommands' parsers, in the order of ``vitviz --help``."""
    from vitviz.cli import build_parser

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


def _escape(text: str) -> str:
    """Plain help text as Markdown: HTML and emphasis characters escaped, `code` spans kept."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span
            out.append(part)
        else:
            part = html.escape(part, quote=False)
            for ch in "\\*_[]|":
                part = part.replace(ch, "\\" + ch)
            out.append(part)
    return "".join(out).replace("\n", " ")


def _paragraphs(text: str) -> list[str]:
    """A raw argparse description as Markdown paragraphs; indented lines stay a text block."""
    blocks = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t")) for line in lines):
            blocks.append("```text\n" + para + "\n```")
        else:
            blocks.append(_escape(" ".join(line.strip() for line in lines)))
    return blocks


def _argument_rows(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for a in actions:
        if a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            name = ", ".join(a.option_strings)
            if a.nargs != 0:
                name += " " + formatter._format_args(a, a.dest.upper())
        else:
            name = formatter._format_args(a, a.dest)
        if a.required:
            default = "required"
        elif a.nargs == 0 or a.default in (None, argparse.SUPPRESS) or a.default == []:
            default = ""
        else:
            default = f"`{a.default}`"
        meaning = _escape(formatter._expand_help(a)) if a.help else ""
        if a.choices is not None and not isinstance(a, argparse._SubParsersAction):
            meaning += (" " if meaning else "") + "One of: " + ", ".join(f"`{c}`" for c in a.choices) + "."
        rows.append(f"| `{name}` | {default} | {meaning} |")
    return rows


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for group in parser._action_groups:
        rows = _argument_rows(parser, group._group_actions)
        if not rows:
            continue
        out += [f"### {group.title[:1].upper()}{group.title[1:]}", "",
                "| argument | default | meaning |", "|---|---|---|", *rows, ""]
    return out


def command_page(name: str, parser: argparse.ArgumentParser) -> str:
    """The Markdown page of one command."""
    usage = parser.format_usage().strip().removeprefix("usage: ")
    lines = [f"# vitviz {name}", "", *sum(([p, ""] for p in _paragraphs(parser.description or "")), []),
             "## Usage", "", "```text", usage, "```", "", "## Arguments", "", *_arguments(parser)]
    if parser.epilog:
        example = parser.epilog.strip().removeprefix("example:").strip()
        lines += ["## Example", "", "```text", example, "```", ""]
    lines += ["Exit statuses: [the same for every command](../exit-status.md). "
              "This page is generated from the command's parser by `docs/hooks.py`.", ""]
    return "\n".join(lines)


def index_page(parser: argparse.ArgumentParser, subs: dict[str, argparse.ArgumentParser]) -> str:
    """The page of the ``vitviz`` command: its commands, global options and examples."""
    from vitviz.cli import EXAMPLES

    helps = {a.dest: a.help for a in next(a for a in parser._actions
                                          if isinstance(a, argparse._SubParsersAction))._choices_actions}
    lines = ["# Commands", "", _escape(parser.description or ""), "",
             "```text", parser.format_usage().strip().removeprefix("usage: "), "```", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`vitviz {n}`]({n}.md) | {_escape(helps.get(n) or '')} |" for n in subs]
    lines += ["", "## Options of every command", "", *_arguments(parser),
              "## Examples", "", "```text", EXAMPLES.strip(), "```", "",
              "Exit statuses are listed in [Exit statuses](../exit-status.md). "
              "These pages are generated from the parsers by `docs/hooks.py`.", ""]
    return "\n".join(lines)


def _fill_commands(nav: list, names: list[str]) -> bool:
    """Replace the nav entry of ``reference/cli/index.md`` by a section with one page per command."""
    for i, item in enumerate(nav):
        if isinstance(item, dict):
            (title, value), = item.items()
            if value == f"{CLI_DIR}/index.md":
                nav[i] = {title: [f"{CLI_DIR}/index.md"] + [{f"vitviz {n}": f"{CLI_DIR}/{n}.md"} for n in names]}
                return True
            if isinstance(value, list) and _fill_commands(value, names):
                return True
    return False


def on_config(config):
    _, subs = command_parsers()
    if not _fill_commands(config["nav"], list(subs)):
        log.warning(f"the nav has no entry for {CLI_DIR}/index.md: the command pages are not listed")
    return config


# ---------------------------------------------------------------------------------------------
# generated files


def _figures_module():
    spec = importlib.util.spec_from_file_location("vitviz_docs_figures", ROOT / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config) -> Files:
    global _tmp
    parser, subs = command_parsers()
    files.append(File.generated(config, f"{CLI_DIR}/index.md", content=index_page(parser, subs)))
    for name, sub in subs.items():
        files.append(File.generated(config, f"{CLI_DIR}/{name}.md", content=command_page(name, sub)))
    _tmp = tempfile.TemporaryDirectory(prefix="vitviz-docs-figures-")
    out = Path(_tmp.name)
    for path in _figures_module().draw(out):
        files.append(File.generated(config, "figures/" + path.relative_to(out).as_posix(), abs_src_path=str(path)))
    return files


# ---------------------------------------------------------------------------------------------
# the API pages

API_MARKER = re.compile(r"^<!-- api (vitviz[\w.]*) -->$", re.M)


def public_names(package: str) -> list[str]:
    """A module's public names: its ``__all__``, else what it defines without a leading underscore."""
    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, v in vars(mod).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == package]
    return list(names)


def api_block(package: str) -> str:
    """The reference of one package: its names re-exported by ``vitviz`` (each with its
    ``vitviz.NAME`` entry), then the package itself with its other public names."""
    import vitviz

    mod = importlib.import_module(package)
    names = public_names(package)
    at_root = [n for n in names if n in vitviz.__all__ and getattr(vitviz, n) is getattr(mod, n)]
    rest = [n for n in names if n not in at_root]
    blocks = [f"::: vitviz.{n}" for n in at_root]
    blocks.append(f"::: {package}\n    options:\n      members: [{', '.join(rest)}]")
    return "\n\n".join(blocks)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return API_MARKER.sub(lambda m: api_block(m.group(1)), markdown)


# ---------------------------------------------------------------------------------------------
# every public name has a reference entry and a docstring


def _undocumented(names: list[str]) -> list[str]:
    import griffe

    package = griffe.load("vitviz", search_paths=[str(ROOT)], resolve_aliases=True,
                          resolve_external=False)
    missing = []
    for name in names:
        try:
            obj = package[name]
            doc = obj.docstring.value.strip() if obj.docstring else ""
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            doc = ""
        if not doc:
            missing.append(name)
    return missing


def on_post_build(config) -> None:
    global _tmp
    import vitviz

    site = Path(config["site_dir"])
    ids: set[str] = set()
    for page in site.rglob("*.html"):
        ids.update(re.findall(r'id="(vitviz\.[\w.]+)"', page.read_text(encoding="utf-8")))
    names = [n for n in vitviz.__all__ if n != "__version__"]  # a string, documented on the API index
    no_entry = [n for n in names if f"vitviz.{n}" not in ids]
    if no_entry:
        log.warning(f"these names of vitviz.__all__ have no reference entry (add `::: vitviz.NAME` "
                    f"to a page under docs/reference/api/): {', '.join(no_entry)}")
    no_doc = _undocumented(names)
    if no_doc:
        log.warning(f"these names of vitviz.__all__ have no docstring: {', '.join(no_doc)}")
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None
