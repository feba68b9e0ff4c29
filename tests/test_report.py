"""ddim_worker.report on a real (fake-job) output folder: the HTML parsed with html.parser, links checked on disk,
the contact sheet measured, and the report opened once in headless Chromium."""

from __future__ import annotations

import html
import io
import os
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddim_worker import report
from ddim_worker.outputs import OutputLayout
from ddim_worker.columns import results_table

XSS = '<script>alert("x")</script> & "quotes"'
ERR_C = "read timed out after 5.0s <img src=x onerror=alert(1)>"

# id -> (input colour, edited colour, reconstruction colour); None = that image is not written.
COLOURS = {
    "a": ((220, 30, 30), (30, 200, 30), None),
    "b": ((30, 30, 220), (220, 220, 30), (30, 220, 220)),
    "d": ((120, 60, 10), (10, 120, 60), None),
    "e": ((200, 100, 200), (90, 90, 90), None),
    "f": (None, (250, 140, 0), None),
}


def _png(colour: tuple[int, int, int], size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _rows() -> list[dict]:
    base = {"num_steps": 10, "start_step": 0, "guidance_scale": 3.5, "inversion_guidance": 1.0, "seed": 7,
            "inversion": "ddim"}
    rows = [
        {"id": "a", "source_prompt": "a cat", "edit_prompt": "a dog", "status": "ok"},
        {"id": "b", "source_prompt": "a house", "edit_prompt": "a castle", "status": "ok", "psnr": 31.25,
         "ssim": 0.875, "latent_mse": 0.00123},
        {"id": "c", "source_prompt": "a tree", "edit_prompt": "a bush", "status": "failed",
         "error_code": "fetch_timeout", "error": ERR_C},
        {"id": "d", "source_prompt": "a car", "edit_prompt": "a bike", "status": "skipped"},
        {"id": "e", "source_prompt": XSS, "edit_prompt": "</article><h1>owned</h1>", "status": "ok"},
        {"id": "f", "source_prompt": "a lake", "edit_prompt": "a sea", "status": "ok"},
    ]
    for i, r in enumerate(rows):
        r.update(base, manifest_row=i, image_url=f"https://example.com/{r['id']}.jpg")
        # where the job wrote each image: the results say so (a failed row's say nothing)
        for kind, colour in zip(KINDS, COLOURS.get(r["id"], (None, None, None))):
            if colour is not None and r["status"] != "failed":
                r[report.URI_COLUMNS[kind]] = f"/out/{OutputLayout.relative_image(kind, r['id'])}"
    return rows


KINDS = ("input", "edited", "reconstruction")


def _path(root: Path, kind: str, row_id: str) -> Path:
    return root / OutputLayout.relative_image(kind, row_id)


def _make_job(root: Path) -> Path:
    for row_id, colours in COLOURS.items():
        for kind, colour in zip(KINDS, colours):
            if colour is not None:
                _path(root, kind, row_id).parent.mkdir(parents=True, exist_ok=True)
                _path(root, kind, row_id).write_bytes(_png(colour))
    # A failed row's id never shows images, even if an object of that name exists (duplicate ids).
    _path(root, "edited", "c").parent.mkdir(parents=True, exist_ok=True)
    _path(root, "edited", "c").write_bytes(_png((0, 0, 0)))
    return root


def _ref(kind: str, row_id: str) -> str:
    folder, _, name = OutputLayout.relative_image(kind, row_id).rpartition("/")
    return f"{folder}/{urllib.parse.quote(name, safe='')}"


@pytest.fixture
def job(tmp_path) -> Path:
    return _make_job(tmp_path / "job")


# --------------------------------------------------------------------------------------------------------------------
# Parsing


class Page(HTMLParser):
    """What the tests need from one report page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.cards: list[dict] = []
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self.rel: dict[str, str] = {}
        self.failed: list[dict] = []
        self.text: list[str] = []
        self._card: dict | None = None
        self._depth = 0
        self._in_failed = False
        self._tr: dict | None = None
        self._td: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if a.get(key) is not None:
                self.refs.append(a[key])
        if tag == "a" and a.get("rel") in ("prev", "next"):
            self.rel[a["rel"]] = a["href"]
        if tag == "section" and a.get("id") == "failed":
            self._in_failed = True
        if tag == "article":
            if self._card is not None:
                self._depth += 1
            elif "card" in (a.get("class") or "").split():
                self._card = {"id": a.get("data-id"), "status": a.get("data-status"), "imgs": [], "text": []}
                self._depth = 0
        if self._card is not None and tag == "img":
            self._card["imgs"].append(a["src"])
        if self._in_failed and tag == "tr" and "data-id" in a:
            self._tr = {"id": a["data-id"], "cells": []}
        if self._tr is not None and tag == "td":
            self._td = []

    def handle_endtag(self, tag):
        if tag == "article" and self._card is not None:
            if self._depth:
                self._depth -= 1
            else:
                self._card["text"] = "".join(self._card["text"])
                self.cards.append(self._card)
                self._card = None
        if tag == "section":
            self._in_failed = False
        if tag == "td" and self._tr is not None and self._td is not None:
            self._tr["cells"].append("".join(self._td))
            self._td = None
        if tag == "tr" and self._tr is not None:
            self.failed.append(self._tr)
            self._tr = None

    def handle_data(self, data):
        self.text.append(data)
        if self._card is not None:
            self._card["text"].append(data)
        if self._td is not None:
            self._td.append(data)


def _parse(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def _check_refs(page_path: Path, page: Page) -> int:
    """Every src/href is relative (no scheme, host or absolute path) and names a file that exists; returns count."""
    for ref in page.refs:
        parts = urllib.parse.urlsplit(ref)
        assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), ref
        target = page_path.parent / urllib.parse.unquote(parts.path) if parts.path else page_path
        assert target.is_file(), f"{ref} -> {target} does not exist"
        if parts.fragment:
            assert parts.fragment in _parse(target).ids, f"{ref}: no element #{parts.fragment}"
    return len(page.refs)


# --------------------------------------------------------------------------------------------------------------------
# HTML


def test_report_cards_links_and_failed_rows(job):
    out = report.write_report(str(job), _rows())
    assert out == {"pages": [str(job / "report.html")], "contact_sheet": str(job / "contact-sheet.png"), "cards": 6}
    assert sorted(p.name for p in job.glob("report*.html")) == ["report.html"]

    page = _parse(job / "report.html")
    assert [c["id"] for c in page.cards] == ["a", "b", "c", "d", "e", "f"]
    assert [c["status"] for c in page.cards] == ["ok", "ok", "failed", "skipped", "ok", "ok"]
    assert _check_refs(job / "report.html", page) > 10
    assert "script" not in page.tags  # no scripts at all, inline or external

    cards = {c["id"]: c for c in page.cards}
    # Images: the ones that exist, by relative path, and nothing else.
    assert cards["a"]["imgs"] == [_ref("input", "a"), _ref("edited", "a")]
    assert cards["b"]["imgs"] == [_ref("input", "b"), _ref("edited", "b"), _ref("reconstruction", "b")]
    assert cards["d"]["imgs"] == [_ref("input", "d"), _ref("edited", "d")]
    assert cards["f"]["imgs"] == [_ref("edited", "f")]
    assert cards["a"]["imgs"][1].startswith("images/") and cards["a"]["imgs"][1].count("/") == 2  # a prefix folder
    assert "no input" in cards["f"]["text"] and "no reconstruction" in cards["a"]["text"]
    assert cards["c"]["imgs"] == []  # failed: no images even though images/c.png exists
    # Prompts, settings, metrics.
    assert "a cat" in cards["a"]["text"] and "a dog" in cards["a"]["text"]
    assert "num_steps=10" in cards["a"]["text"] and "seed=7" in cards["a"]["text"]
    assert "31.25 dB" in cards["b"]["text"] and "0.8750" in cards["b"]["text"]
    assert "PSNR" not in cards["a"]["text"]
    assert "https://example.com/a.jpg" in cards["a"]["text"]  # shown as text...
    assert not any("example.com" in r for r in page.refs)  # ...never linked

    # Failed rows: the table lists each with code and error; the card shows them too.
    assert page.failed == [{"id": "c", "cells": ["c", "fetch_timeout", ERR_C]}]
    assert "fetch_timeout" in cards["c"]["text"] and ERR_C in cards["c"]["text"]
    assert "Failed rows (1)" in "".join(page.text)
    # Summary counts.
    text = " ".join("".join(page.text).split())
    assert "rows: 6" in text and "ok: 4" in text and "skipped: 1" in text and "failed: 1" in text


def test_untrusted_text_is_escaped(job):
    report.write_report(str(job), _rows())
    raw = (job / "report.html").read_text(encoding="utf-8")
    assert "<script" not in raw.lower()
    assert "<h1>owned" not in raw and "<img src=x" not in raw
    assert html.escape(XSS) in raw
    page = _parse(job / "report.html")
    assert len(page.cards) == 6  # the "</article>" in a prompt did not close a card
    card = {c["id"]: c for c in page.cards}["e"]
    assert XSS in card["text"] and "</article><h1>owned</h1>" in card["text"]
    assert page.tags.count("h1") == 1


def test_odd_ids_are_escaped_and_quoted(tmp_path):
    root = tmp_path / "job"
    _path(root, "edited", "x y#1").parent.mkdir(parents=True)
    _path(root, "edited", "x y#1").write_bytes(_png((1, 2, 3)))
    rows = [{"id": "x y#1", "status": "ok", "output_uri": str(_path(root, "edited", "x y#1"))},
            {"id": '"><b>bad', "status": "failed", "error_code": "bad_setting", "error": "id cannot be used"}]
    report.write_report(str(root), rows)
    page = _parse(root / "report.html")
    assert [c["id"] for c in page.cards] == ["x y#1", '"><b>bad']
    assert page.cards[0]["imgs"] == [_ref("edited", "x y#1")] and page.cards[0]["imgs"][0].endswith("/x%20y%231.png")
    raw = (root / "report.html").read_text(encoding="utf-8")
    assert '"><b>bad' not in raw and "&quot;&gt;&lt;b&gt;bad" in raw
    _check_refs(root / "report.html", page)


def test_paging(job):
    out = report.write_report(str(job), _rows(), page_size=2)
    names = ["report.html", "report-2.html", "report-3.html"]
    assert out["pages"] == [str(job / n) for n in names] and out["cards"] == 6
    pages = {n: _parse(job / n) for n in names}
    assert [[c["id"] for c in pages[n].cards] for n in names] == [["a", "b"], ["c", "d"], ["e", "f"]]
    for n in names:
        _check_refs(job / n, pages[n])  # includes the failed table's link to report-2.html#row-2

    # Follow next from page 1 to the end and prev back.
    seen, name = [], "report.html"
    while True:
        seen.append(name)
        if "next" not in pages[name].rel:
            break
        name = pages[name].rel["next"]
    assert seen == names
    assert "prev" not in pages["report.html"].rel
    assert pages["report-3.html"].rel["prev"] == "report-2.html"
    assert pages["report-2.html"].rel["prev"] == "report.html"
    # The failed table is on page 1 and links to the card on its page; later pages link back to it.
    assert [f["id"] for f in pages["report.html"].failed] == ["c"]
    assert 'href="report-2.html#row-2"' in (job / "report.html").read_text()
    assert "report.html#failed" in pages["report-3.html"].refs

    # A shorter report later removes the now stale pages.
    report.write_report(str(job), _rows(), page_size=200)
    assert sorted(p.name for p in job.glob("report*.html")) == ["report.html"]
    assert "next" not in _parse(job / "report.html").rel


def test_table_input_and_results_parquet(job):
    rows = [{k: v for k, v in r.items() if k not in ("psnr", "ssim", "latent_mse")} for r in _rows()]
    rows[1]["psnr"] = 31.25  # the results schema has the fidelity columns; only PSNR is filled here
    table = results_table(rows)
    (job / "results").mkdir()
    pq.write_table(table, job / "results" / "ok-r000001-a01-0123456789abcdef.parquet")
    from ddim_worker.job.ledger import read_table
    from ddim_worker.outputs import OutputLayout

    for results in (table, read_table(OutputLayout(str(job)), images=False)):  # the table, and the ledger read back
        out = report.write_report(str(job), results)
        page = _parse(job / "report.html")
        assert [c["id"] for c in page.cards] == ["a", "b", "c", "d", "e", "f"] and out["cards"] == 6
        assert "31.25 dB" in page.cards[1]["text"] and "SSIM" not in page.cards[1]["text"]


def test_empty_and_all_failed(tmp_path):
    root = tmp_path / "job"
    (root).mkdir()
    (root / "contact-sheet.png").write_bytes(b"stale")
    out = report.write_report(str(root), [{"id": "z", "status": "failed", "error_code": "not_found",
                                           "error": "404"}])
    assert out["contact_sheet"] is None and not (root / "contact-sheet.png").exists()
    page = _parse(root / "report.html")
    assert [(c["id"], c["status"]) for c in page.cards] == [("z", "failed")]
    assert page.failed == [{"id": "z", "cells": ["z", "not_found", "404"]}]
    _check_refs(root / "report.html", page)

    out = report.write_report(str(root), [])
    assert out == {"pages": [str(root / "report.html")], "contact_sheet": None, "cards": 0}
    assert _parse(root / "report.html").cards == []


def test_fsspec_url(job):
    """An fsspec URL (file://) goes through storage like s3:// would."""
    out = report.write_report("file://" + str(job), _rows(), page_size=4)
    assert out["pages"] == ["file://" + str(job / "report.html"), "file://" + str(job / "report-2.html")]
    assert len(_parse(job / "report.html").cards) == 4 and len(_parse(job / "report-2.html").cards) == 2


# --------------------------------------------------------------------------------------------------------------------
# Contact sheet


def _close(a, b, tol=3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_contact_sheet_geometry_and_tiles(job):
    out = report.write_report(str(job), _rows())
    data = (job / "contact-sheet.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    sheet = Image.open(job / "contact-sheet.png").convert("RGB")

    # Ok/skipped rows with an image: a, b, d, e, f (c failed) -> 5 lines; b has a reconstruction -> 3 columns.
    lines, cols = 5, 3
    expected = (report.SHEET_PAD + cols * (report.TILE + report.SHEET_PAD),
                report.SHEET_HEADER_H + lines * (report.CAPTION_H + report.TILE + report.SHEET_PAD))
    assert sheet.size == expected == report.sheet_size(lines, cols)
    # The tile count recovered from the size alone.
    assert (sheet.width - report.SHEET_PAD) % (report.TILE + report.SHEET_PAD) == 0
    assert (sheet.height - report.SHEET_HEADER_H) % report.LINE_H == 0
    n_cols = (sheet.width - report.SHEET_PAD) // (report.TILE + report.SHEET_PAD)
    n_lines = (sheet.height - report.SHEET_HEADER_H) // report.LINE_H
    assert n_cols * n_lines == 15

    # Each tile's centre is its image's colour (or the "n/a" grey where the image is missing).
    for i, row_id in enumerate(["a", "b", "d", "e", "f"]):
        for c, colour in enumerate(COLOURS[row_id]):
            x = report.SHEET_PAD + c * (report.TILE + report.SHEET_PAD) + report.TILE // 2
            y = report.SHEET_HEADER_H + i * report.LINE_H + report.CAPTION_H + report.TILE // 4
            want = colour if colour is not None else (150, 150, 150)
            assert _close(sheet.getpixel((x, y)), want), (row_id, c, sheet.getpixel((x, y)), want)
    assert out["contact_sheet"] == str(job / "contact-sheet.png")


def test_contact_sheet_limits_rows_and_columns(job):
    report.write_report(str(job), _rows(), sheet_rows=1)  # only "a": no reconstruction -> 2 columns
    with Image.open(job / "contact-sheet.png") as im:
        assert im.size == report.sheet_size(1, 2)
    report.write_report(str(job), _rows(), sheet_rows=3)  # a, b, d
    with Image.open(job / "contact-sheet.png") as im:
        assert im.size == report.sheet_size(3, 3)


def test_unreadable_image_is_a_placeholder_tile(job):
    _path(job, "edited", "a").write_bytes(b"not a png")
    report.write_report(str(job), _rows())
    sheet = Image.open(job / "contact-sheet.png").convert("RGB")
    x = report.SHEET_PAD + (report.TILE + report.SHEET_PAD) + report.TILE // 2
    y = report.SHEET_HEADER_H + report.CAPTION_H + report.TILE // 4
    assert _close(sheet.getpixel((x, y)), (150, 150, 150))


# --------------------------------------------------------------------------------------------------------------------
# Headless Chromium


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(job, tmp_path):
    report.write_report(str(job), _rows())
    url = (job / "report.html").as_uri()

    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    assert [(c["id"], c["status"]) for c in page.cards] == [
        ("a", "ok"), ("b", "ok"), ("c", "failed"), ("d", "skipped"), ("e", "ok"), ("f", "ok")]
    assert "script" not in page.tags  # the prompt's <script> stayed text in the live DOM too
    assert XSS in {c["id"]: c for c in page.cards}["e"]["text"]
    assert page.failed == [{"id": "c", "cells": ["c", "fetch_timeout", ERR_C]}]

    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, "--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=1200,1600", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1200, 1600)
        rgb = im.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, cards, images: not a blank page
    top = max(colours)[1]
    # The row images were loaded and drawn (file: images allowed by the page's CSP): row a's input and edit.
    pixels = {c for _, c in colours}
    for want in (COLOURS["a"][0], COLOURS["a"][1]):
        assert any(_close(p, want, 6) for p in pixels), f"{want} not on the screenshot (background {top})"
    keep = os.environ.get("DDIM_REPORT_SCREENSHOT")
    if keep:  # to look at it: DDIM_REPORT_SCREENSHOT=/tmp/report.png pytest tests/test_report.py -k chromium
        shutil.copyfile(shot, keep)


# --------------------------------------------------------------------------------------------------------------------
# S3


def test_report_on_s3(s3_server, tmp_path):
    """The same job on a real S3 server (SeaweedFS): listings, reads and writes all go through storage."""
    import uuid

    from ddim_worker import storage

    opts = s3_server.storage_options
    base = f"{s3_server.make_bucket('report-tests')}/{uuid.uuid4().hex}"
    local = _make_job(tmp_path / "job")
    for path in local.rglob("*.png"):
        storage.write_bytes(storage.join_uri(base, *path.relative_to(local).parts), path.read_bytes(), opts)

    out = report.write_report(base, _rows(), opts, page_size=4)
    assert out == {"pages": [f"{base}/report.html", f"{base}/report-2.html"],
                   "contact_sheet": f"{base}/contact-sheet.png", "cards": 6}
    pages = [Page(storage.read_bytes(u, opts).decode("utf-8")) for u in out["pages"]]
    assert [c["id"] for p in pages for c in p.cards] == ["a", "b", "c", "d", "e", "f"]
    for p in pages:
        for ref in p.refs:
            parts = urllib.parse.urlsplit(ref)
            assert not parts.scheme and not parts.netloc
            assert storage.exists(storage.join_uri(base, urllib.parse.unquote(parts.path)), opts), ref
    with Image.open(io.BytesIO(storage.read_bytes(out["contact_sheet"], opts))) as im:
        assert im.format == "PNG" and im.size == report.sheet_size(5, 3)

    report.write_report(base, _rows(), opts)  # one page now: report-2.html is removed
    assert not storage.exists(f"{base}/report-2.html", opts)
