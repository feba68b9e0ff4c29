"""A static report of a finished job: ``report.html`` (paged) and ``contact-sheet.png`` under the output prefix.

What gets written (all through :mod:`ddim_worker.storage`, each object whole or not at all, so it works on S3):

- ``report.html`` - page 1: a summary (row counts by status), the "Failed rows" table (every failed row of the job
  with its id, ``error_code`` and ``error``, linking to its card) and the first ``page_size`` cards.
- ``report-2.html``, ``report-3.html``, ... - the next pages when there are more rows than ``page_size``; every page
  has first/prev/next/last links. Stale ``report-N.html`` pages of an earlier, longer report are removed.
- ``contact-sheet.png`` - a grid with one line per ok/skipped row that has an image (the first ``sheet_rows`` of
  them): tiles input | edited (| reconstruction, | mask, where rows have them) under a caption strip with the row
  id (geometry below).

The pages are self-contained: inline CSS, no scripts at all (a Content-Security-Policy meta tag forbids them), no
external URLs. Images are referenced by relative paths (``images/<p>/<id>.png``, ``inputs/<p>/<id>.png``,
``reconstructions/<p>/<id>.png``, see ``outputs``) and only where the row's results say the object was written
(``output_uri``, ``input_uri``, ``reconstruction_uri``, ``mask_uri``): nothing is listed or probed per row.
A row's ``image_url`` is shown as text, never as a link. Every text from the manifest or the results (ids, prompts,
errors, URLs) is HTML-escaped: manifests are untrusted.

Contact-sheet geometry (``sheet_size`` computes it; a reader can recover the tile count from the PNG size)::

    cols   = 2 (input | edited), + 1 if a row on the sheet has a reconstruction, + 1 if one has a mask
    width  = SHEET_PAD + cols * (TILE + SHEET_PAD)
    height = SHEET_HEADER_H + lines * LINE_H,   LINE_H = CAPTION_H + TILE + SHEET_PAD
    tiles  = cols * lines

A line is a ``CAPTION_H`` strip with the id (Pillow's default font) above its tiles; each image is scaled to fit a
``TILE`` x ``TILE`` square (aspect kept, centred on grey); a missing or unreadable image is a darker "n/a" tile.
"""

from __future__ import annotations

import html
import io
import math
import re
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from ddim_worker import storage
from ddim_worker.outputs import CONTACT_SHEET_NAME, IMAGE_FOLDERS, REPORT_NAME, OutputLayout, report_page_name
from ddim_worker.rows import FAILED, FILTERED, OK, SKIPPED
from ddim_worker.core.settings import SETTING_NAMES

__all__ = [
    "TILE",
    "CAPTION_H",
    "SHEET_PAD",
    "SHEET_HEADER_H",
    "LINE_H",
    "REPORT_NAME",
    "CONTACT_SHEET_NAME",
    "page_name",
    "sheet_size",
    "write_report",
]

#: Side of one contact-sheet tile (pixels); images are scaled to fit it, aspect kept.
TILE = 128
#: Height of the caption strip (row id) above each line of tiles.
CAPTION_H = 16
#: Gap between tiles, around the grid and below each line.
SHEET_PAD = 4
#: Height of the header strip with the column names at the top of the sheet.
SHEET_HEADER_H = 18
#: Height of one line of the sheet (caption strip + tiles + gap).
LINE_H = CAPTION_H + TILE + SHEET_PAD

#: Folders (under the output prefix) holding the per-row images, in the column order of cards and the sheet.
IMAGE_KINDS = tuple(IMAGE_FOLDERS.items())

_SETTINGS = tuple(name for name in SETTING_NAMES if name != "negative_prompt")
_RUN_FIELDS = ("cache_hit", "inversion_passes", "sampling_passes", "unet_passes", "seconds")
_METRICS = (("psnr", "PSNR", "{:.2f} dB"), ("ssim", "SSIM", "{:.4f}"), ("latent_mse", "latent MSE", "{:.4g}"),
            ("score", "score (CLIP direction)", "{:.3f}"), ("clip_image_similarity", "CLIP image", "{:.3f}"),
            ("clip_text_similarity", "CLIP text", "{:.3f}"))
_PAGE_RE = re.compile(r"^report-(\d+)\.html$")

_BG = (236, 236, 236)
_TILE_BG = (200, 200, 200)
_MISSING_BG = (150, 150, 150)
_TEXT = (20, 20, 20)


page_name = report_page_name


def sheet_size(lines: int, cols: int) -> tuple[int, int]:
    """(width, height) of a contact sheet with ``lines`` lines of ``cols`` tiles (see the module docstring)."""
    return SHEET_PAD + cols * (TILE + SHEET_PAD), SHEET_HEADER_H + lines * LINE_H


# --------------------------------------------------------------------------------------------------------------------
# Rows


def _clean(value: Any) -> Any:
    """NumPy scalars to Python, NaN to None (Ray batches and pandas turn nulls into NaN)."""
    if value is not None and hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _rows(results: list[Mapping[str, Any]] | pa.Table) -> list[dict[str, Any]]:
    items: Iterable[Mapping[str, Any]] = results.to_pylist() if isinstance(results, pa.Table) else results
    return [{k: _clean(v) for k, v in dict(r).items()} for r in items]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _status(row: Mapping[str, Any]) -> str:
    return _text(row.get("status")) or "unknown"


#: The results column that says where a row's image of each kind was written.
URI_COLUMNS = {"input": "input_uri", "edited": "output_uri", "reconstruction": "reconstruction_uri",
               "mask": "mask_uri"}

#: Kinds shown only when some row has one (--measure-fidelity, --mask auto): input and edited are always shown.
OPTIONAL_KINDS = ("reconstruction", "mask")


def _shown_kinds(images: Iterable[set[str]]) -> list[str]:
    present = set().union(*images)
    return [kind for kind, _ in IMAGE_KINDS if kind not in OPTIONAL_KINDS or kind in present]


def _href(kind: str, row_id: str) -> str:
    """Relative, URL-quoted reference to the row's image of ``kind`` (safe inside a quoted attribute once escaped)."""
    folder, _, name = OutputLayout.relative_image(kind, row_id).rpartition("/")
    return f"{folder}/{urllib.parse.quote(name, safe='')}"


def _row_images(row: Mapping[str, Any]) -> set[str]:
    """The kinds of image this row has. Failed rows show none: their id may be another row's (duplicates)."""
    if _status(row) == FAILED or row.get("id") is None:
        return set()
    return {kind for kind, column in URI_COLUMNS.items() if row.get(column)}


# --------------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       background: #f3f4f6; color: #111827; }
header.top, main, footer { max-width: 1200px; margin: 0 auto; padding: 12px 20px; }
h1 { font-size: 22px; margin: 8px 0; }
h2 { font-size: 17px; margin: 18px 0 8px; }
.summary { display: flex; flex-wrap: wrap; gap: 8px; list-style: none; padding: 0; margin: 8px 0; }
.summary li { background: #fff; border: 1px solid #d1d5db; border-radius: 6px; padding: 4px 10px; }
.summary b { font-size: 16px; }
nav.pager { display: flex; gap: 12px; align-items: center; margin: 10px 0; }
nav.pager a, nav.pager span.off { padding: 3px 10px; border: 1px solid #9ca3af; border-radius: 4px;
       background: #fff; text-decoration: none; color: #1d4ed8; }
nav.pager span.off { color: #9ca3af; border-color: #e5e7eb; }
table.failed { border-collapse: collapse; width: 100%; background: #fff; }
table.failed th, table.failed td { border: 1px solid #e5e7eb; padding: 4px 8px; text-align: left;
       vertical-align: top; }
table.failed th { background: #fee2e2; }
table.failed td.error { white-space: pre-wrap; word-break: break-word; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 12px; }
article.card { background: #fff; border: 1px solid #d1d5db; border-left: 6px solid #9ca3af; border-radius: 6px;
       padding: 10px 12px; overflow-wrap: anywhere; }
article.card[data-status="ok"] { border-left-color: #16a34a; }
article.card[data-status="skipped"] { border-left-color: #2563eb; }
article.card[data-status="failed"] { border-left-color: #dc2626; background: #fff7f7; }
article.card h3 { font-size: 15px; margin: 0 0 6px; display: flex; justify-content: space-between; gap: 8px; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px; background: #e5e7eb;
       white-space: nowrap; }
.badge.ok { background: #dcfce7; color: #166534; }
.badge.skipped { background: #dbeafe; color: #1e40af; }
.badge.filtered { background: #fef3c7; color: #92400e; }
.badge.failed { background: #fee2e2; color: #991b1b; }
.images { display: flex; gap: 6px; margin: 6px 0; }
.images figure { margin: 0; flex: 1 1 0; min-width: 0; text-align: center; }
.images img { width: 100%; height: auto; aspect-ratio: 1; object-fit: contain; background: #e5e7eb;
       display: block; }
.images figcaption { font-size: 12px; color: #4b5563; }
.images .missing { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
       background: #f3f4f6; color: #9ca3af; font-size: 12px; border: 1px dashed #d1d5db; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 6px 0; }
dt { color: #6b7280; }
dd { margin: 0; }
.error { color: #991b1b; }
code { font-size: 12px; word-break: break-all; }
footer { color: #6b7280; font-size: 12px; }
"""

# No scripts at all, nothing fetched from elsewhere: the only things a page loads are its own inline CSS and images
# next to it. (file: pages need 'self' plus file: for their images in Chromium.)
_CSP = "default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _text(value)


def _dl(pairs: list[tuple[str, str]]) -> str:
    """A definition list; values are already escaped HTML."""
    if not pairs:
        return ""
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _card(row: Mapping[str, Any], index: int, images: set[str], shown: list[str]) -> str:
    status = _status(row)
    row_id = _text(row.get("id"))
    parts = [
        f'<article class="card" id="row-{index}" data-id="{_e(row_id)}" data-status="{_e(status)}">',
        f'<h3><span class="id">{_e(row_id) or "<i>(no id)</i>"}</span>'
        f'<span class="badge {_e(status)}">{_e(status)}</span></h3>',
    ]
    if status != FAILED:
        kinds = shown
        figs = []
        for kind in kinds:
            if kind in images:
                ref = _e(_href(kind, row_id))
                figs.append(f'<figure class="{kind}"><a href="{ref}"><img src="{ref}" alt="{kind} {_e(row_id)}" '
                            f'loading="lazy"></a><figcaption>{kind}</figcaption></figure>')
            else:
                figs.append(f'<figure class="{kind}"><div class="missing">no {kind}</div>'
                            f"<figcaption>{kind}</figcaption></figure>")
        parts.append('<div class="images">' + "".join(figs) + "</div>")

    info: list[tuple[str, str]] = []
    for key, label in (("source_prompt", "source"), ("edit_prompt", "edit"), ("negative_prompt", "negative")):
        if row.get(key) not in (None, ""):
            info.append((label, _e(row[key])))
    if row.get("image_url") not in (None, ""):
        info.append(("image", f"<code>{_e(row['image_url'])}</code>"))
    if status == FAILED or row.get("error_code") or row.get("error"):
        info.append(("error_code", f'<span class="error">{_e(row.get("error_code"))}</span>'))
        info.append(("error", f'<span class="error">{_e(row.get("error"))}</span>'))
    metrics = [(label, _e(spec.format(row[key]))) for key, label, spec in _METRICS
               if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
    settings = ", ".join(f"{k}={_fmt(row[k])}" for k in _SETTINGS if row.get(k) is not None)
    run = ", ".join(f"{k}={_fmt(row[k])}" for k in _RUN_FIELDS if row.get(k) is not None)
    extra = [("settings", _e(settings))] if settings else []
    if run:
        extra.append(("run", _e(run)))
    parts.append(_dl(info + metrics + extra))
    parts.append("</article>")
    return "".join(parts)


def _pager(number: int, pages: int) -> str:
    if pages <= 1:
        return ""

    def link(target: int, label: str) -> str:
        if target < 1 or target > pages or target == number:
            return f'<span class="off">{label}</span>'
        rel = ' rel="prev"' if target == number - 1 else ' rel="next"' if target == number + 1 else ""
        return f'<a href="{page_name(target)}"{rel}>{label}</a>'

    return (f'<nav class="pager">{link(1, "&laquo; first")}{link(number - 1, "&lsaquo; prev")}'
            f"<span>page {number} of {pages}</span>"
            f'{link(number + 1, "next &rsaquo;")}{link(pages, "last &raquo;")}</nav>')


def _page(
    *,
    title: str,
    number: int,
    pages: int,
    cards: list[str],
    first_index: int,
    total: int,
    counts: Counter,
    failed_rows: list[tuple[int, Mapping[str, Any]]],
    page_of: int,
    has_sheet: bool,
) -> str:
    summary = "".join(f'<li class="{_e(s)}">{_e(s)}: <b>{n}</b></li>' for s, n in
                      sorted(counts.items(), key=lambda kv: ({OK: 0, FILTERED: 1, SKIPPED: 2, FAILED: 3}.get(kv[0], 4), kv[0])))
    last_index = first_index + len(cards)
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(title)}{'' if pages == 1 else f' - page {number} of {pages}'}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header class="top"><h1>{_e(title)}</h1>',
        f'<ul class="summary"><li class="total">rows: <b>{total}</b></li>{summary}</ul>',
    ]
    if has_sheet:
        head.append(f'<p><a href="{CONTACT_SHEET_NAME}">contact sheet</a></p>')
    head.append(_pager(number, pages) + "</header><main>")

    body: list[str] = []
    if number == 1:
        body.append(f'<section id="failed" class="failed"><h2>Failed rows ({len(failed_rows)})</h2>')
        if failed_rows:
            body.append('<table class="failed"><thead><tr><th>id</th><th>error_code</th><th>error</th></tr></thead>'
                        "<tbody>")
            for index, row in failed_rows:
                target = f"{page_name(index // page_of + 1)}#row-{index}"
                body.append(f'<tr data-id="{_e(row.get("id"))}"><td><a href="{target}">{_e(row.get("id"))}</a></td>'
                            f"<td>{_e(row.get('error_code'))}</td>"
                            f'<td class="error">{_e(row.get("error"))}</td></tr>')
            body.append("</tbody></table>")
        else:
            body.append("<p>none</p>")
        body.append("</section>")
    elif failed_rows:
        body.append(f'<p><a href="{REPORT_NAME}#failed">Failed rows ({len(failed_rows)})</a></p>')

    shown = f"rows {first_index + 1}-{last_index} of {total}" if cards else "no rows"
    body.append(f'<section id="rows"><h2>Rows <small>({shown})</small></h2><div class="cards">')
    body.extend(cards)
    body.append("</div></section></main>")
    foot = [f"<footer>{_pager(number, pages)}generated by ddim-edit</footer></body></html>"]
    return "\n".join(head + body + foot) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Contact sheet


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fit(text: str, draw, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tile(data: bytes | None):
    from PIL import Image, ImageOps

    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (TILE, TILE))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.contain(im, (TILE, TILE), Image.Resampling.LANCZOS)
    except Exception:  # noqa: BLE001 - an unreadable image is a "n/a" tile, never a failed report
        return None
    tile = Image.new("RGB", (TILE, TILE), _TILE_BG)
    tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    return tile


def _contact_sheet(
    output_uri: str, storage_options: dict | None, lines: list[tuple[Mapping, set[str]]], kinds: list[str]
) -> bytes:
    from PIL import Image, ImageDraw

    width, height = sheet_size(len(lines), len(kinds))
    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for c, kind in enumerate(kinds):
        x = SHEET_PAD + c * (TILE + SHEET_PAD)
        draw.text((x + 2, 3), kind, fill=_TEXT, font=font)
    for i, (row, images) in enumerate(lines):
        y = SHEET_HEADER_H + i * LINE_H
        row_id = _text(row.get("id"))
        caption = f"{row_id} [{_status(row)}]"
        if isinstance(row.get("psnr"), (int, float)):
            caption += f" psnr {row['psnr']:.2f}"
        draw.text((SHEET_PAD + 2, y + 2), _fit(caption, draw, font, width - 2 * SHEET_PAD - 4), fill=_TEXT, font=font)
        for c, kind in enumerate(kinds):
            x = SHEET_PAD + c * (TILE + SHEET_PAD)
            ty = y + CAPTION_H
            data = None
            if kind in images:
                try:
                    data = storage.read_bytes(
                        OutputLayout(output_uri).image(kind, row_id), storage_options)
                except (OSError, FileNotFoundError):
                    data = None
            tile = _tile(data)
            if tile is None:
                draw.rectangle((x, ty, x + TILE - 1, ty + TILE - 1), fill=_MISSING_BG)
                tw = draw.textlength("n/a", font=font)
                draw.text((x + (TILE - tw) // 2, ty + TILE // 2 - 6), "n/a", fill=(235, 235, 235), font=font)
            else:
                sheet.paste(tile, (x, ty))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=True)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def write_report(
    output_uri: str,
    results: list[dict] | pa.Table,
    storage_options: dict | None = None,
    *,
    page_size: int = 200,
    sheet_rows: int = 64,
    title: str = "ddim-edit report",
) -> dict:
    """Write ``report.html`` (+ ``report-N.html`` pages) and ``contact-sheet.png`` under ``output_uri``.

    ``results``: the job's result rows (list of dicts or a table in ``RESULTS_SCHEMA``, optionally with ``psnr``,
    ``ssim``, ``latent_mse``), in the order the cards should appear (``job.ledger.read_table`` reads an output's).
    Returns ``{"pages": [uri, ...], "contact_sheet": uri or None, "cards": number of cards}``.
    """
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    if sheet_rows < 0:
        raise ValueError("sheet_rows must be >= 0")
    rows = _rows(results)

    # Where each image is comes from the rows themselves: no listing, no probe per row (thousands of rows on S3).
    layout = OutputLayout(output_uri)
    images = [_row_images(r) for r in rows]
    shown = _shown_kinds(images)

    # Contact sheet: the first `sheet_rows` ok/filtered/skipped rows that have an image (filtered ones say so).
    sheet_lines = [(r, im) for r, im in zip(rows, images)
                   if _status(r) in (OK, FILTERED, SKIPPED) and im]
    sheet_lines.sort(key=lambda line: "input" not in line[1])  # rows with their input first (a sample has them)
    sheet_lines = sheet_lines[:sheet_rows]
    sheet_uri = layout.contact_sheet
    if sheet_lines:
        kinds = _shown_kinds(im for _, im in sheet_lines)
        storage.write_bytes(sheet_uri, _contact_sheet(output_uri, storage_options, sheet_lines, kinds),
                            storage_options)
    else:
        storage.remove(sheet_uri, storage_options)  # a stale sheet of an earlier run would mislead
        sheet_uri = None

    counts = Counter(_status(r) for r in rows)
    failed_rows = [(i, r) for i, r in enumerate(rows) if _status(r) == FAILED]
    n_pages = max(1, math.ceil(len(rows) / page_size))
    uris = [layout.report_page(n) for n in range(1, n_pages + 1)]
    # Later pages first, page 1 last: once report.html is there, every page it links to is too.
    for number in range(n_pages, 0, -1):
        start = (number - 1) * page_size
        cards = [_card(rows[i], i, images[i], shown) for i in range(start, min(start + page_size, len(rows)))]
        text = _page(title=title, number=number, pages=n_pages, cards=cards, first_index=start, total=len(rows),
                     counts=counts, failed_rows=failed_rows, page_of=page_size, has_sheet=sheet_uri is not None)
        storage.write_bytes(uris[number - 1], text.encode("utf-8"), storage_options)

    for name in storage.list_names(output_uri, storage_options, suffix=".html"):
        m = _PAGE_RE.match(name)
        if m and int(m.group(1)) > n_pages:
            storage.remove(storage.join_uri(output_uri, name), storage_options)

    return {"pages": uris, "contact_sheet": sheet_uri, "cards": len(rows)}
