"""The gallery's static HTML pages: a thumbnail grid with per-method tabs and a larger view.

The pages are self-contained: inline CSS and JavaScript, no server, no network, no external
resources; they open from ``file://``. Every name, label, caption and reason is
HTML-escaped here in Python, and every file reference is URL-quoted; the script only
switches CSS classes and clones ``<template>`` markup that Python escaped, so no text from a
file name ever reaches the page as markup. Large galleries are split into pages of
``page_size`` images (``index.html``, ``index-2.html``, ...), each one a complete page.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .._util.files import atomic_write_bytes

if TYPE_CHECKING:
    pass

_PAGE = re.compile(r"^index-(\d+)\.html$")


def esc(value: object) -> str:
    """HTML-escape any value for text or a double- or single-quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def url(path: str) -> str:
    """A relative file reference, URL-quoted (``#``, ``?``, ``%``, spaces, Unicode) and escaped."""
    return esc(quote(str(path), safe="/"))


def page_name(page: int) -> str:
    """``index.html`` for page 1, ``index-<n>.html`` for the others."""
    return "index.html" if page == 1 else f"index-{page}.html"


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#f4f4f4}
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px}
h1{font-size:18px;margin:0 0 4px}
#summary{margin:0 0 6px;color:#555}
.bar{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.tabs button{border:1px solid #bbb;background:#fafafa;border-radius:4px;padding:3px 10px;cursor:pointer;font:inherit}
.tabs button[aria-selected="true"]{background:#2962ff;border-color:#2962ff;color:#fff}
.pager a,.pager span{padding:2px 6px}
.pager .cur{font-weight:bold}
#filter{padding:3px 6px;font:inherit;border:1px solid #bbb;border-radius:4px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px;padding:12px 16px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden;cursor:pointer}
.card:focus,.card:hover{outline:2px solid #2962ff}
.thumb{aspect-ratio:1/1;background:#eee;display:flex;align-items:center;justify-content:center}
.thumb img{width:100%;height:100%;object-fit:contain;display:none}
.card figcaption{padding:4px 6px;font-size:12px;overflow-wrap:anywhere}
.card .name{display:block;font-weight:600}
.card .pred,.card .cap{display:block;color:#444}
.card.skipped .thumb,.card.failed .thumb{color:#b00020;font-weight:bold}
.card .why{display:block;color:#b00020}
.card.hidden{display:none}
#viewer{position:fixed;inset:0;z-index:5;background:rgba(0,0,0,.75);display:flex;align-items:flex-start;justify-content:center;overflow:auto;padding:24px}
#viewer[hidden]{display:none}
#viewer-box{background:#fff;border-radius:8px;padding:12px 16px;max-width:min(1400px,96vw);position:relative}
#close{position:absolute;top:6px;right:8px;font-size:20px;border:0;background:none;cursor:pointer}
.detail h2{font-size:16px;margin:0 24px 4px 0;overflow-wrap:anywhere}
.detail .src,.detail .why{color:#555;overflow-wrap:anywhere;margin:2px 0}
.detail .why{color:#b00020}
.views{display:flex;flex-wrap:wrap;gap:12px;margin-top:8px;align-items:flex-start}
.views figure{margin:0;max-width:100%}
.views img{display:block;max-width:100%;height:auto}
.views figcaption{font-weight:600;margin-bottom:2px}
table.top5{border-collapse:collapse;margin-top:6px}
table.top5 td,table.top5 th{border-bottom:1px solid #eee;padding:1px 8px;text-align:left}
"""

_JS = r"""
(function () {
  "use strict";
  var body = document.body;
  var tabs = Array.prototype.slice.call(document.querySelectorAll(".tabs button"));
  var names = tabs.map(function (b) { return b.getAttribute("data-name"); });
  function setTab(i) {
    body.setAttribute("data-tab", String(i));
    tabs.forEach(function (b, j) { b.setAttribute("aria-selected", j === i ? "true" : "false"); });
    if (history.replaceState) { history.replaceState(null, "", "#tab=" + encodeURIComponent(names[i])); }
  }
  tabs.forEach(function (b, i) { b.addEventListener("click", function () { setTab(i); }); });
  var m = /^#tab=(.*)$/.exec(location.hash);
  if (m) { var k = names.indexOf(decodeURIComponent(m[1])); if (k >= 0) { setTab(k); } }
  Array.prototype.forEach.call(document.querySelectorAll(".pager a"), function (a) {
    a.addEventListener("click", function () {
      a.setAttribute("href", a.getAttribute("href").split("#")[0] + location.hash);
    });
  });
  var cards = Array.prototype.slice.call(document.querySelectorAll("#grid .card"));
  var viewer = document.getElementById("viewer");
  var box = document.getElementById("viewer-body");
  var closeBtn = document.getElementById("close");
  var current = -1;
  function open(i) {
    current = i;
    var t = cards[i].querySelector("template");
    box.replaceChildren(t.content.cloneNode(true));
    viewer.hidden = false;
    closeBtn.focus();
  }
  function close() {
    viewer.hidden = true;
    box.replaceChildren();
    if (current >= 0) { cards[current].focus(); }
    current = -1;
  }
  cards.forEach(function (c, i) {
    c.addEventListener("click", function () { open(i); });
    c.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(i); }
    });
  });
  closeBtn.addEventListener("click", close);
  viewer.addEventListener("click", function (e) { if (e.target === viewer) { close(); } });
  document.addEventListener("keydown", function (e) {
    if (viewer.hidden) { return; }
    if (e.key === "Escape") { close(); }
    else if (e.key === "ArrowRight" && current < cards.length - 1) { open(current + 1); }
    else if (e.key === "ArrowLeft" && current > 0) { open(current - 1); }
  });
  var filter = document.getElementById("filter");
  filter.addEventListener("input", function () {
    var q = filter.value.toLowerCase();
    cards.forEach(function (c) {
      c.classList.toggle("hidden", q !== "" && c.getAttribute("data-key").toLowerCase().indexOf(q) < 0);
    });
  });
})();
"""


def _prediction_text(rec: dict[str, Any]) -> str:
    p = rec.get("prediction")
    if not p:
        return ""
    label = p.get("label") if p.get("label") is not None else f"class {p.get('index')}"
    return f"{label} ({100 * float(p.get('prob', 0)):.1f}%)"


def _detail(rec: dict[str, Any], tabs: Sequence[str]) -> str:
    parts = [f'<div class="detail"><h2>{esc(rec["key"])}</h2>',
             f'<p class="src">{esc(rec.get("source"))}</p>']
    if rec.get("status") != "done":
        parts.append(f'<p class="why">{esc(rec.get("status"))}: {esc(rec.get("reason"))}</p>')
    if rec.get("caption"):
        parts.append(f'<p class="cap">{esc(rec["caption"])}</p>')
    top5 = rec.get("top5") or []
    if top5:
        rows = "".join(
            f'<tr><td>{esc(t.get("label") if t.get("label") is not None else "class " + str(t.get("index")))}'
            f'</td><td>{100 * float(t.get("prob", 0)):.1f}%</td></tr>' for t in top5)
        parts.append(f'<table class="top5"><tr><th>top-5</th><th>p</th></tr>{rows}</table>')
    if rec.get("explore"):
        parts.append(f'<p class="explore"><a href="{url(rec["explore"])}" target="_blank" rel="noopener">'
                     'explore: every layer and head, click a patch</a></p>')
    if rec.get("status") == "done":
        parts.append('<div class="views">')
        if rec.get("image"):
            parts.append(f'<figure><figcaption>input</figcaption><img src="{url(rec["image"])}" '
                         f'alt="{esc(rec["key"])}"></figure>')
        for m in tabs:
            out = (rec.get("outputs") or {}).get(m)
            if not out:
                continue
            # shown at its own size (never enlarged: the pictures are drawn at the size they are
            # shown at); a grid's labels are in the picture, drawn at its resolution
            size = out.get("size")
            dims = f' width="{int(size[1])}" height="{int(size[0])}"' if size else ""
            names = out.get("names")
            tip = f' title="{esc(", ".join(names))}"' if names else ""  # whole names, should a label be cut
            parts.append(f'<figure><figcaption>{esc(m)} · <a href="{url(out["npy"])}">.npy</a>'
                         f'</figcaption><img src="{url(out["overlay"])}"{dims}{tip} '
                         f'alt="{esc(m)}: {esc(rec["key"])}"></figure>')
            if out.get("animation"):  # a video clip: every input frame with the map of its tubelet
                parts.append(f'<figure><figcaption>{esc(m)} · every frame</figcaption>'
                             f'<img class="anim" src="{url(out["animation"])}" '
                             f'alt="{esc(m)} over every frame: {esc(rec["key"])}"></figure>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _card(rec: dict[str, Any], tabs: Sequence[str]) -> str:
    status = rec.get("status") or "skipped"
    key = rec["key"]
    head = (f'<figure class="card {esc(status)}" tabindex="0" data-key="{esc(key)}" '
            f'title="{esc(rec.get("source"))}">')
    if status == "done":
        imgs = []
        if rec.get("image"):
            imgs.append(f'<img class="t t0" src="{url(rec["image"])}" alt="{esc(key)}" loading="lazy">')
        for i, m in enumerate(tabs, start=1):
            out = (rec.get("outputs") or {}).get(m)
            if out:
                imgs.append(f'<img class="t t{i}" src="{url(out["overlay"])}" alt="{esc(m)}: {esc(key)}" '
                            'loading="lazy">')
        thumb = f'<div class="thumb">{"".join(imgs)}</div>'
        pred = _prediction_text(rec)
        extra = (f'<span class="pred">{esc(pred)}</span>' if pred else "") + \
                (f'<span class="cap">{esc(rec["caption"])}</span>' if rec.get("caption") else "")
    else:
        thumb = f'<div class="thumb">{esc(status)}</div>'
        extra = f'<span class="why">{esc(rec.get("reason"))}</span>'
    caption = f'<figcaption><span class="name">{esc(key)}</span>{extra}</figcaption>'
    return f"{head}{thumb}{caption}<template>{_detail(rec, tabs)}</template></figure>"


def _pager(page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    show = sorted({1, pages} | set(range(max(1, page - 2), min(pages, page + 2) + 1)))
    items = []
    if page > 1:
        items.append(f'<a href="{page_name(page - 1)}" rel="prev">‹ prev</a>')
    last = 0
    for p in show:
        if p - last > 1:
            items.append("<span>…</span>")
        items.append(f'<span class="cur">{p}</span>' if p == page else f'<a href="{page_name(p)}">{p}</a>')
        last = p
    if page < pages:
        items.append(f'<a href="{page_name(page + 1)}" rel="next">next ›</a>')
    return f'<nav class="pager" aria-label="pages">{"".join(items)}</nav>'


def render_pages(records: Sequence[dict[str, Any]], *, methods: Sequence[str], title: str = "vitviz gallery",
                 model: str | None = None, page_size: int = 100) -> list[tuple[str, str]]:
    """The HTML pages of a gallery (pure: no files touched).

    Args:
        records: manifest records in gallery order (see :func:`vitviz.gallery.build_gallery`).
        methods: the method names, one tab each after the ``input`` tab.
        title: page title.
        model: model name shown in the summary.
        page_size: images per page.

    Returns:
        ``[(file name, html text), ...]``, one per page (at least one).
    """
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    tabs = list(methods)
    n = len(records)
    counts = {s: sum(1 for r in records if r.get("status") == s) for s in ("done", "skipped", "failed")}
    pages = max(1, -(-n // page_size))
    tab_css = "".join(f'body[data-tab="{i}"] .t{i}{{display:block}}' for i in range(len(tabs) + 1))
    buttons = "".join(
        f'<button type="button" data-tab="{i}" data-name="{esc(name)}" '
        f'aria-selected="{"true" if i == 0 else "false"}">{esc(name)}</button>'
        for i, name in enumerate(["input"] + tabs))
    summary = (f'<span id="count">{n}</span> images: {counts["done"]} done, {counts["skipped"]} skipped, '
               f'{counts["failed"]} failed' + (f" · model {esc(model)}" if model else "")
               + (f" · methods {esc(', '.join(tabs))}" if tabs else ""))
    out = []
    for page in range(1, pages + 1):
        chunk = records[(page - 1) * page_size: page * page_size]
        first = (page - 1) * page_size + 1 if chunk else 0
        where = f"page {page} of {pages}, images {first}–{first + len(chunk) - 1}" if chunk else "no images"
        cards = "\n".join(_card(r, tabs) for r in chunk)
        page_title = esc(title) + (f" · page {page} of {pages}" if pages > 1 else "")
        out.append((page_name(page), f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="vitviz">
<link rel="icon" href="data:,">
<title>{page_title}</title>
<style>{_CSS}{tab_css}</style></head>
<body data-tab="0" data-page="{page}" data-pages="{pages}" data-total="{n}">
<header><h1>{esc(title)}</h1>
<p id="summary">{summary}</p>
<div class="bar"><nav class="tabs" aria-label="methods">{buttons}</nav>
<input id="filter" type="search" placeholder="filter this page by name" aria-label="filter by name">
<span id="where">{esc(where)}</span>{_pager(page, pages)}</div></header>
<main id="grid">
{cards}
</main>
<div id="viewer" hidden role="dialog" aria-modal="true" aria-label="image view"><div id="viewer-box">
<button type="button" id="close" aria-label="close">×</button><div id="viewer-body"></div></div></div>
<noscript><p>Tabs and the larger view need JavaScript; the images are in the folders next to this page.</p></noscript>
<script>{_JS}</script>
</body></html>
"""))
    return out


def write_gallery_html(out_dir: str | Path, records: Sequence[dict[str, Any]], *, methods: Sequence[str],
                       title: str = "vitviz gallery", model: str | None = None,
                       page_size: int = 100) -> Path:
    """Write the gallery pages into ``out_dir`` (atomically) and remove pages left over from a
    larger earlier gallery.

    Returns:
        The path of ``index.html``.

    Example:
        >>> write_gallery_html("gallery", records, methods=["rollout", "cls"])
        PosixPath('gallery/index.html')
    """
    out_dir = Path(out_dir)
    pages = render_pages(records, methods=methods, title=title, model=model, page_size=page_size)
    for name, text in pages:
        atomic_write_bytes(out_dir / name, text.encode("utf-8"))
    for p in out_dir.glob("index-*.html"):
        m = _PAGE.match(p.name)
        if m and int(m.group(1)) > len(pages):
            p.unlink(missing_ok=True)
    return out_dir / "index.html"
