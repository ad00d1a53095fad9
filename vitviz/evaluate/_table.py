"""The report table of the evaluations: one row per map method, one column per score.

Used by :meth:`vitviz.evaluate.sanity.SanityReport.table` (``vitviz sanity``) and by the
benchmarks of :mod:`vitviz.zoo` (``vitviz benchmark-maps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Table:
    """Rows of ``method -> {metric: mean}`` with the number of scenes scored.

    Attributes:
        rows: method name -> {column key: value}.
        columns: column key -> (header, higher is better), in display order.
        n: the number of images (scenes) the means are over.
        notes: what the reader should know (e.g. methods left out).
        extra: other results (accuracy, seconds per method ...).
    """

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    columns: dict[str, tuple[str, bool]] = field(default_factory=dict)
    n: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def format(self, markdown: bool = False) -> str:
        """The table as fixed-width text (or a Markdown table).

        Args:
            markdown: a Markdown table instead of aligned text.

        Returns:
            The table; columns no row has are left out, missing and NaN values show ``-``.
        """
        cols = [c for c in self.columns if any(c in r for r in self.rows.values())]
        heads = ["method"] + [self.columns[c][0] for c in cols]
        body = [[name] + [f"{r[c]:.3f}" if c in r and not math.isnan(r[c]) else "-" for c in cols]
                for name, r in self.rows.items()]
        if markdown:
            lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            return "\n".join(lines)
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(heads)]
        fmt = lambda row: "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i])  # noqa: E731
                                    for i, v in enumerate(row))
        lines = [fmt(heads), "  ".join("-" * w for w in widths)] + [fmt(row) for row in body]
        return "\n".join(lines)


__all__ = ["Table"]
