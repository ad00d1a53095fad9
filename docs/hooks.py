"""MkDocs hooks of the vitviz site (``hooks:`` in mkdocs.yml); nothing here is published.

* The command reference is generated from the argparse parsers (``vitviz.cli.build_parser``):
  ``reference/cli/index.md`` and one page per command, added to the nav under "Commands", so a
  new option or command is documented by the build that follows it.
* The figures are drawn from the bundled models by ``docs/figures.py`` into a temporary folder and
  published under ``figures/``; no figure is a hand-placed file. While writing (``mkdocs serve``
  rebuilds on every change), ``VITVIZ_DOCS_FIGURES=DIR`` publishes the figures already drawn in DIR
  (``python docs/figures.py DIR``) instead of drawing them again.
* An API page holds a marker line ``<!-- api vitviz.PACKAGE -->`` that becomes the package's
  reference: first each of its names that ``vitviz`` re-exports (``::: vitviz.NAME``), then the
  package with the rest of its public names, taken from its ``__all__`` at build time.
* ``<!-- api-index -->`` becomes a table of ``vitviz.__all__`` and ``<!-- models-table -->`` the
  table of model names (the bundled models and the aliases), both read from the code.
* After the build, every name in ``vitviz.__all__`` must have a reference entry (an anchor
  ``vitviz.<name>`` in some page) and a docstring; a missing one is a warning, which fails
  ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import os
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
        if a.required and a.nargs not in ("?", "*"):
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
    drawn = os.environ.get("VITVIZ_DOCS_FIGURES")
    if drawn:
        out = Path(drawn)
        paths = sorted(p for p in out.rglob("*") if p.is_file())
    else:
        _tmp = tempfile.TemporaryDirectory(prefix="vitviz-docs-figures-")
        out = Path(_tmp.name)
        paths = _figures_module().draw(out)
    for path in paths:
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


def _shadowed(package: str, name: str) -> bool:
    """True when ``package.name`` is a function or class that shares its name with a submodule
    (``vitviz.analyze._rollout``): griffe reads the name as the submodule, Python as the function."""
    import types

    mod = importlib.import_module(package)
    return (hasattr(mod, "__path__") and importlib.util.find_spec(f"{package}.{name}") is not None
            and not isinstance(getattr(mod, name), types.ModuleType))


def _entry(path: str, package: str, name: str) -> str:
    """``::: path``; for a shadowed name, the object at its defining module, headed ``path`` and
    with the anchor ``path`` (so that ``[path][]`` links to it)."""
    if not _shadowed(package, name):
        return f"::: {path}"
    obj = getattr(importlib.import_module(package), name)
    return (f"[](){{#{path}}}\n::: {obj.__module__}.{obj.__qualname__}\n"
            f"    options:\n      heading: \"{path}\"\n      toc_label: \"{path}\"")


def api_block(package: str) -> str:
    """The reference of one package: its names re-exported by ``vitviz`` (each with its
    ``vitviz.NAME`` entry), then the package itself with its other public names."""
    import vitviz

    mod = importlib.import_module(package)
    names = public_names(package)
    at_root = [n for n in names if n in vitviz.__all__ and getattr(vitviz, n) is getattr(mod, n)]
    shadowed = [n for n in names if n not in at_root and _shadowed(package, n)]
    rest = [n for n in names if n not in at_root and n not in shadowed]
    blocks = [_entry(f"vitviz.{n}", package, n) for n in at_root]
    blocks.append(f"::: {package}\n    options:\n      members: [{', '.join(rest)}]")
    blocks += [_entry(f"{package}.{n}", package, n) for n in shadowed]
    return "\n\n".join(blocks)


def api_index() -> str:
    """A table of every name in ``vitviz.__all__``, linked to its entry, with its first docstring line."""
    import inspect

    import vitviz

    rows = ["| name | what it is |", "|---|---|"]
    for name in vitviz.__all__:
        obj = getattr(vitviz, name)
        if isinstance(obj, str):  # __version__
            summary = f"the version of this vitviz, `{obj}`"
        else:
            summary = _escape((inspect.getdoc(obj) or "").strip().split("\n\n")[0])
        rows.append(f"| [`vitviz.{name}`][vitviz.{name}] | {summary} |")
    return "\n".join(rows)


def models_table() -> str:
    """The model names ``vitviz.load_model`` knows, from the zoo and the alias table."""
    from vitviz.models import ALIASES
    from vitviz.zoo import ZOO

    rows = ["| name | source | model | what it is |", "|---|---|---|---|"]
    rows += [f"| `{name}` | bundled with vitviz | `{name}` | {_escape(entry.about)} |" for name, entry in ZOO.items()]
    for name, alias in ALIASES.items():
        ids = ", ".join(f"`{i}`" + (f" ({size} px)" if len(alias.ids) > 1 else "")
                        for size, i in sorted(alias.ids.items())) if getattr(alias, "ids", None) \
            else f"`{alias.default_id}`"
        rows.append(f"| `{name}` | {alias.source} | {ids} | {_escape(alias.about)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = markdown.replace("<!-- api-index -->", api_index())
    markdown = markdown.replace("<!-- models-table -->", models_table())
    return API_MARKER.sub(lambda m: api_block(m.group(1)), markdown)


# ---------------------------------------------------------------------------------------------
# every public name has a reference entry and a docstring


def _undocumented(names: list[str]) -> list[str]:
    """The names whose object has no docstring of its own (a class does not inherit ``__doc__``)."""
    import vitviz

    return [n for n in names if not (getattr(getattr(vitviz, n), "__doc__", None) or "").strip()]


def _kind(obj) -> str:
    import inspect

    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "attribute"


def on_post_build(config) -> None:
    global _tmp
    import vitviz

    site = Path(config["site_dir"])
    kinds: dict[str, set[str]] = {}  # anchor -> kinds of the entries it heads
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        # an entry's heading is followed by <span class="doc doc-object-name doc-KIND-name">; an
        # anchor placed before an entry by <div class="doc doc-object doc-KIND">
        for anchor, named, placed in re.findall(
                r'id="(vitviz\.[\w.]+)"[^>]*>(?:(?!id=").){0,400}?'
                r'doc-(?:object-name doc-(\w+)-name|object doc-(\w+)")', text, re.S):
            kinds.setdefault(anchor, set()).add(named or placed)
        for anchor in re.findall(r'id="(vitviz\.[\w.]+)"', text):
            kinds.setdefault(anchor, set())
    names = list(vitviz.__all__)
    no_entry = [n for n in names if f"vitviz.{n}" not in kinds]
    if no_entry:
        log.warning(f"these names of vitviz.__all__ have no reference entry (add `::: vitviz.NAME` "
                    f"to a page under docs/reference/api/): {', '.join(no_entry)}")
    wrong = [f"vitviz.{n} (a {_kind(getattr(vitviz, n))}, documented as {'/'.join(sorted(kinds[f'vitviz.{n}']))})"
             for n in names if f"vitviz.{n}" in kinds and kinds[f"vitviz.{n}"]
             and _kind(getattr(vitviz, n)) not in kinds[f"vitviz.{n}"]]
    if wrong:
        log.warning(f"these reference entries document another object than the name: {', '.join(wrong)}")
    no_doc = _undocumented([n for n in names if n != "__version__"])  # a string: no docstring of its own
    if no_doc:
        log.warning(f"these names of vitviz.__all__ have no docstring: {', '.join(no_doc)}")
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None
