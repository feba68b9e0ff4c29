"""Every row accounted for: bad input of many kinds, the URL policy end to end, fast failures for a bad set-up."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.jobkit import picture, png_path, result_rows, run, write_manifest

pytestmark = pytest.mark.usefixtures("ray_session")


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims width x height: a decompression bomb that costs nothing to make."""
    data = bytearray(_save(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _images() -> dict[str, bytes]:
    rgb = Image.open(io.BytesIO(picture(7, size=96)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 200, 40, 40] + [0] * 762)
    palette.paste(0, (0, 0, 32, 64))
    gray16 = Image.fromarray((np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16))
    good_jpeg = _save(rgb, "JPEG", quality=90)
    return {
        "good.png": _save(rgb, "PNG"),
        "flaky.png": picture(8, size=96),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": _save(gray16, "PNG"),
        "palette.png": _save(palette, "PNG", transparency=0),
        "exif.jpg": _save(rgb.crop((0, 0, 96, 64)), "JPEG", exif=exif),
        "gray.png": _save(rgb.convert("L"), "PNG"),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "text.png": b"this is not an image, just text with a .png name\n",
        "empty.png": b"",
        "bomb.png": _png_claiming_size(30000, 30000),
        "tiny.png": _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
    }


GOOD = ["good", "flaky", "cmyk", "gray16", "palette", "exif", "gray"]


def _rows(server, flaky_key: str) -> tuple[list[dict], dict[str, str]]:
    """(manifest rows, expected status or error code by id)."""
    def row(rid, url, **kw):
        return {"id": rid, "image_url": url, "source_prompt": "a picture", "edit_prompt": "a red picture",
                "num_steps": None, "start_step": None, "guidance_scale": None, **kw}

    url = server.url
    rows = [
        row("good", url("good.png")),
        row("flaky", url(f"flaky/{flaky_key}/flaky.png")),  # 500 first, then the image: retried
        row("cmyk", url("cmyk.jpg")),
        row("gray16", url("gray16.png")),
        row("palette", url("palette.png")),
        row("exif", url("exif.jpg")),
        row("gray", url("gray.png")),
        row("missing", url("status/404")),
        row("hang", url("hang")),
        row("truncated", url("truncated.jpg")),
        row("text", url("text.png")),
        row("empty", url("empty.png")),
        row("bomb", url("bomb.png")),
        row("tiny", url("tiny.png")),
        row("no-source", url("good.png"), source_prompt="   "),
        row("long-prompt", url("good.png"), edit_prompt="a red picture " * 143),
        row("start-after-end", url("good.png"), num_steps="6", start_step="6"),
        row("negative-guidance", url("good.png"), guidance_scale="-2"),
        row("zero-steps", url("good.png"), num_steps="0"),
        row("not-a-number", url("good.png"), guidance_scale="lots"),
        row("good", url("gray.png")),  # duplicate id: the first row keeps it
        row("../../etc/x", url("good.png")),
        row("passwd", "file:///etc/passwd"),
        row("gopher", "gopher://example.invalid/x.png"),
        row("server-error", url("status/503")),
        row("opted-out", url("robots/good.png?tag=noai")),  # the server opts the image out of AI use
        row("null-url", None),  # a null is missing, never the text "None" or "nan"
    ]
    expected = {rid: "ok" for rid in GOOD}
    expected.update({
        "missing": "not_found", "hang": "fetch_timeout", "truncated": "bad_image", "text": "not_an_image",
        "empty": "not_an_image", "bomb": "too_large", "tiny": "bad_image", "no-source": "bad_prompt",
        "long-prompt": "bad_prompt", "start-after-end": "bad_setting", "negative-guidance": "bad_setting",
        "zero-steps": "bad_setting", "not-a-number": "bad_setting", "../../etc/x": "bad_setting",
        "passwd": "unsafe_url", "gopher": "unsafe_url", "server-error": "fetch_failed", "opted-out": "opted_out",
        "null-url": "missing_image",
    })
    return rows, expected


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_bad_rows_fail_alone_with_clear_codes(http_server, tiny_model_path, tmp_path):
    for name, data in _images().items():
        (http_server.root / name).write_bytes(data)
    rows, expected = _rows(http_server, flaky_key=f"k{time.monotonic_ns()}")
    manifest = write_manifest(rows, str(tmp_path / "manifest.parquet"))
    before = _files(tmp_path)
    started = time.monotonic()
    summary = run(manifest, str(tmp_path / "out"), tiny_model_path, allow_private_network=True,
                  fetch_timeout=1.0, fetch_retries=1)
    elapsed = time.monotonic() - started
    table = result_rows(str(tmp_path / "out"))
    assert [r["manifest_row"] for r in table] == list(range(len(rows)))  # every row accounted for, once
    got = {r["id"]: (r["status"] if r["status"] == "ok" else r["error_code"]) for r in table
           if r["error_code"] != "duplicate_id"}
    assert got == expected
    duplicate = table[20]
    assert (duplicate["id"], duplicate["status"], duplicate["error_code"]) == ("good", "failed", "duplicate_id")
    assert "also manifest row 0" in duplicate["error"]
    assert all(r["error"] for r in table if r["status"] == "failed")
    assert summary["counts"] == {"ok": len(GOOD), "filtered": 0, "failed": len(rows) - len(GOOD), "skipped": 0}
    print(f"bad-rows job: {len(rows)} rows in {elapsed:.1f}s")

    # Good rows give the same bytes as a clean run of just them.
    clean = write_manifest([r for r in rows[:7]], str(tmp_path / "clean.parquet"))
    run(clean, str(tmp_path / "clean-out"), tiny_model_path, allow_private_network=True, fetch_retries=1)
    for rid in GOOD:
        assert png_path(tmp_path / "out", rid).read_bytes() == \
            png_path(tmp_path / "clean-out", rid).read_bytes(), rid
    # Nothing is written outside --output.
    after = _files(tmp_path) - before
    assert all(p.startswith(("out", "clean-out", "clean.parquet")) for p in after), after
    assert not Path("/etc/x").exists() and not (tmp_path / "etc").exists()
