"""`vitviz methods`: the registered map methods, what each needs and its options."""

from __future__ import annotations

import json

NAME = "methods"
HELP = "list the map methods (gallery, sanity, benchmark-maps) with what they need and their options"
DESCRIPTION = (
    "Every map method of the one registry (vitviz.explain.register_method): built-in ones and those "
    "your code registered before calling the command. Columns: the name used with --methods; what it "
    "needs (attention: one captured forward pass; grad: plus one backward pass of the class logit; "
    "model: it runs the model itself, e.g. captioning; texts: texts to locate; none: it ignores the "
    "model, a baseline; vitviz[EXTRA]: an optional package); whether it streams (computes layer by layer, "
    "keeping no layer); its maps per image (map: one; stack: several of the same count, e.g. one per "
    "head, averaged by sanity and benchmark-maps; list: a varying count, e.g. caption words: gallery "
    "only); its options with their defaults; a description.")
EXAMPLE = "vitviz methods"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per method, one per line")


def _value(v) -> str:
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def describe(method) -> dict:
    """What ``vitviz methods`` shows of one method.

    Args:
        method: a :class:`vitviz.explain.Method`.

    Returns:
        ``{"name", "needs", "streams", "maps", "options", "extra", "description"}``.
    """
    return {"name": method.name, "needs": list(method.requirements), "streams": method.stream is not None,
            "maps": method.output, "options": dict(method.defaults), "extra": method.extra,
            "description": method.description}


def run(args) -> int:
    from ...explain import get_method, list_methods

    rows = [describe(get_method(n)) for n in list_methods()]
    if args.json:
        for r in rows:
            print(json.dumps(r, default=list))
        return 0
    table = [["name", "needs", "streams", "maps", "options", "description"]]
    for r in rows:
        needs = ", ".join(r["needs"]) + (f", vitviz[{r['extra']}]" if r["extra"] else "")
        options = " ".join(f"{k}={_value(v)}" for k, v in r["options"].items()) or "-"
        table.append([r["name"], needs, "yes" if r["streams"] else "no", r["maps"], options, r["description"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    return 0
