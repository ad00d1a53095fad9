"""A griffe extension that reads vitviz's docstring conventions (mkdocs.yml: ``extensions:``).

vitviz's docstrings are Google style (kornia's), with two conventions griffe's Google parser
reads differently:

* ``Example:`` (singular) opens the examples. Griffe reads only ``Examples:`` as the examples
  section and would render the ``>>>`` lines as Markdown quotes; here it becomes ``Examples:``.
* Sphinx roles (``:class:`AttentionMaps` ``, ``:func:`~vitviz.rollout` ``) become code spans:
  Markdown has no roles, and the short names they hold are not all resolvable cross-references.
* A Returns or Yields section opens with the shape of the result (``[B, gh, gw]`` float32: the
  CLS row ...); griffe would read what comes before the colon as a type name. Here the colon
  becomes a dash, so the shape stays in the description and the type comes from the signature.
* One entry may document several parameters that share a description
  (``head_fusion, discard_ratio: as rollout``). Here it becomes one entry per name with that
  description, so each name is still checked against the signature (a name that is not a
  parameter fails the strict build) and listed in the parameter table.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Attributes|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*(?:\([^)]*\))?\s*:.*)$")


def _split_grouped(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        header = _SECTION.match(lines[i])
        out.append(lines[i])
        i += 1
        if not header:
            continue
        base = len(header.group(1))
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base):
            entry = _GROUPED.match(lines[i])
            if not entry:
                out.append(lines[i])
                i += 1
                continue
            indent = len(entry.group(1))
            block = [lines[i]]
            i += 1
            while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
                block.append(lines[i])
                i += 1
            for name in (n.strip() for n in entry.group(2).split(",")):
                out.append(entry.group(1) + name + entry.group(3))
                out.extend(block[1:])
    return out


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|const):`~?([^`]+)`")


_RETURNS = re.compile(r"^(\s*)(Returns|Yields):\s*$")
_SHAPE_FIRST = re.compile(r"^(\s+)([^:]*[`\[][^:]*):\s+(.*)$")


def _shape_first(lines: list[str]) -> list[str]:
    out = list(lines)
    for i, line in enumerate(lines[:-1]):
        if _RETURNS.match(line):
            entry = _SHAPE_FIRST.match(lines[i + 1])
            if entry:
                out[i + 1] = f"{entry.group(1)}{entry.group(2)} — {entry.group(3)}"
    return out


def rewrite(text: str) -> str:
    """A vitviz docstring as griffe's Google parser expects it."""
    text = _ROLE.sub(r"`\1`", text)
    lines = [re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", line) for line in text.split("\n")]
    return "\n".join(_shape_first(_split_grouped(lines)))


class VitvizDocstrings(griffe.Extension):
    """Rewrites each docstring before it is parsed (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
