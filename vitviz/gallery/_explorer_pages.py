"""Explorer pages for a gallery (`vitviz gallery --explore`): one ``explore/<name>.html`` per image.

Each done image gets the page of :func:`vitviz.explore`, written whole (temporary name, then
rename), and its manifest record an ``"explore"`` entry, which the large view links to. A
resumed run keeps the pages that exist.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError


def add_explorer_pages(vm, out_dir: Path, records: list[dict], *, progress: bool = False) -> None:
    """Write the explorer page of every done record that has none yet and note it in the record.

    A record whose image can no longer be read keeps its maps and gets no page (the reason
    goes under ``"explore_error"``).
    """
    from .._util.progress import progress_bar
    from ..explorer import explore

    todo = [r for r in records if r.get("status") == "done"
            and not (r.get("explore") and (out_dir / r["explore"]).is_file())]
    for rec in progress_bar(todo, desc="explore", unit="img", enabled=progress):
        rel = f"explore/{rec['name']}.html"
        try:
            page = explore(vm, rec["source"], title=str(rec["key"]))
        except ImageError as e:
            rec["explore"], rec["explore_error"] = None, str(e)
            continue
        page.save(out_dir / rel)
        rec["explore"] = rel
