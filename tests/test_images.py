"""Tests for ddim_worker.core.images: every image is built here with Pillow; nothing is read from disk or the network."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ddim_worker.core.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    encode_png,
    preprocess,
    read_png_text,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, 1)
    arr = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def _png_claiming(width: int, height: int) -> bytes:
    """A real 16x16 PNG whose IHDR is patched (with a valid CRC) to claim ``width x height``."""
    data = bytearray(_save(Image.new("1", (16, 16)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _code(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)
    return info.value.code


# --- refusals -------------------------------------------------------------------------------------------------


def test_image_error_is_a_value_error_with_code():
    err = ImageError("bad_image", "nope")
    assert isinstance(err, ValueError) and err.code == "bad_image" and str(err) == "nope"


@pytest.mark.parametrize("data", [b"", b"hello, I am a text file named photo.png\n", b"\x00" * 100])
def test_not_an_image(data):
    assert _code(data) == "not_an_image"


def test_truncated_jpeg_is_bad_image():
    data = _save(_gradient(256, 256), "JPEG", quality=90)
    assert decode_image(data).size == (256, 256)
    assert _code(data[: len(data) // 2]) == "bad_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_bad_image():
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noise), "PNG")
    assert _code(data[: len(data) // 2]) == "bad_image"
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    assert _code(bytes(corrupt)) == "bad_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("side", [30000, 10000, 8500])  # over Pillow's hard limit, over its warning limit, under both
def test_bomb_is_too_large_from_the_header(side):
    data = _png_claiming(side, side)
    assert len(data) < 200
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither Pillow's DecompressionBombWarning nor any other may escape
        with pytest.raises(ImageError) as info:
            decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert info.value.code == "too_large"
    assert f"{side}x{side} = {side * side} pixels" in str(info.value)
    assert f"{DEFAULT_MAX_PIXELS} (--max-pixels)" in str(info.value)


def test_max_pixels_is_configurable():
    data = _save(_gradient(64, 48), "PNG")
    assert _code(data, max_pixels=64 * 48 - 1) == "too_large"
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)


def test_too_small_is_bad_image():
    with pytest.raises(ImageError) as info:
        decode_image(_save(Image.new("RGB", (1, 1), RED), "PNG"))
    assert info.value.code == "bad_image"
    assert "image is 1x1, smaller than the minimum side 16" in str(info.value)
    assert _code(_save(Image.new("RGB", (100, 15)), "PNG")) == "bad_image"
    assert decode_image(_save(Image.new("RGB", (8, 8)), "PNG"), min_side=8).size == (8, 8)


# --- modes ----------------------------------------------------------------------------------------------------


def _decoded(img: Image.Image, fmt: str = "PNG", **kwargs) -> np.ndarray:
    out = decode_image(_save(img, fmt), **kwargs)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def test_rgb_png_round_trips_exactly():
    img = _gradient()
    assert np.array_equal(_decoded(img), np.asarray(img))


def test_cmyk_jpeg_colours_close_to_original():
    colours = [RED, GREEN, BLUE, (200, 150, 40), (30, 60, 90), WHITE]
    rgb = Image.new("RGB", (32 * len(colours), 32))
    for i, colour in enumerate(colours):
        rgb.paste(colour, (32 * i, 0, 32 * (i + 1), 32))
    cmyk = rgb.convert("CMYK")
    data = _save(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(decode_image(data)).astype(int)
    for i, colour in enumerate(colours):
        centre = out[16, 32 * i + 16]
        assert np.abs(centre - np.array(colour)).max() <= 8, (colour, centre)


def test_16bit_png_scaled_not_clipped():
    arr = np.zeros((16, 32), dtype=np.uint16)
    arr[:, :8], arr[:, 8:16], arr[:, 16:24] = 65535, 32768, 257
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = _decoded(img)
    assert (out[:, :8] == 255).all()
    assert (np.abs(out[:, 8:16] - 128) <= 1).all()
    assert (out[:, 16:24] == 1).all() and (out[:, 24:] == 0).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_via_tiff(mode):
    arr = np.full((16, 16), 65535, dtype=np.uint16)
    arr[:, 8:] = 32768
    img = Image.fromarray(arr).convert(mode) if mode == "I" else Image.fromarray(arr).convert("I").convert(mode)
    assert img.mode == mode
    out = _decoded(img, "TIFF")
    assert (out[:, :8] == 255).all() and (np.abs(out[:, 8:] - 128) <= 1).all()


@pytest.mark.parametrize(("scale", "value", "expected"), [(1.0, 0.5, 128), (1.0, 1.0, 255), (255.0, 200.0, 200)])
def test_float_image(scale, value, expected):
    arr = np.zeros((16, 16), dtype=np.float32)
    arr[:, :8] = value
    arr[0, -1] = scale if scale > 1 else 0.0  # sets the range: 0..1 or 0..255
    out = _decoded(Image.fromarray(arr), "TIFF")
    assert (np.abs(out[:, :8] - expected) <= 1).all()
    assert (out[1:, 8:] == 0).all()
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_with_transparency_composited_on_background():
    img = Image.new("P", (24, 16))
    img.putpalette([*RED, *GREEN, *BLUE] + [0] * (3 * 253))
    img.paste(1, (8, 0, 16, 16))
    img.paste(2, (16, 0, 24, 16))
    img.info["transparency"] = 2  # blue is transparent
    data = _save(img, "PNG", transparency=2)
    out = np.asarray(decode_image(data)).astype(int)
    assert (out[:, :8] == RED).all() and (out[:, 8:16] == GREEN).all() and (out[:, 16:] == WHITE).all()
    black = np.asarray(decode_image(data, background=(0, 0, 0)))
    assert (black[:, 16:] == 0).all() and (black[:, :8] == RED).all()


def test_palette_without_transparency():
    img = _gradient(32, 32).convert("P")
    out = _decoded(img)
    assert np.array_equal(out, np.asarray(img.convert("RGB")))


def test_rgba_alpha_composited_on_background():
    arr = np.zeros((16, 24, 4), dtype=np.uint8)
    arr[:, :8] = (10, 20, 30, 0)  # fully transparent: colour must not leak
    arr[:, 8:16] = (*RED, 255)
    arr[:, 16:] = (0, 0, 0, 128)  # half-transparent black over white
    out = _decoded(Image.fromarray(arr))
    assert (out[:, :8] == WHITE).all() and (out[:, 8:16] == RED).all()
    assert (np.abs(out[:, 16:] - 127) <= 1).all()
    green_bg = _decoded(Image.fromarray(arr), background=GREEN)
    assert (green_bg[:, :8] == GREEN).all()


def test_la_composited_on_background():
    arr = np.zeros((16, 16, 2), dtype=np.uint8)
    arr[:, :8] = (0, 0)
    arr[:, 8:] = (50, 255)
    out = _decoded(Image.merge("LA", [Image.fromarray(arr[..., i]) for i in range(2)]))
    assert (out[:, :8] == WHITE).all() and (out[:, 8:] == 50).all()


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_to_rgb_with_equal_channels(mode):
    img = _gradient(32, 32).convert(mode)
    out = _decoded(img)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.array_equal(out[..., 0], np.asarray(img.convert("L")))


def test_grayscale_png_with_transparent_key_colour():
    img = Image.new("L", (16, 16), 0)
    img.paste(200, (8, 0, 16, 16))
    out = np.asarray(decode_image(_save(img, "PNG", transparency=0))).astype(int)
    assert (out[:, :8] == WHITE).all() and (out[:, 8:] == 200).all()


def test_pillow_hard_limit_named_when_max_pixels_is_above_it():
    with pytest.raises(ImageError) as info:
        decode_image(_png_claiming(30000, 30000), max_pixels=10**12)
    assert info.value.code == "too_large" and "Pillow's hard limit" in str(info.value)


@pytest.mark.parametrize(("orientation", "corner"), [(6, (0, -1)), (8, (-1, 0))])
def test_exif_orientation_applied(orientation, corner):
    img = Image.new("RGB", (64, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))  # stored top-left corner is red
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(_save(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (32, 64)
    arr = np.asarray(out).astype(int)
    # 6: rotate 90 degrees clockwise, top-left goes top-right; 8: counter-clockwise, top-left goes bottom-left.
    assert np.abs(arr[corner] - RED).max() <= 16, arr[corner]
    for other in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        if other != corner:
            assert np.abs(arr[other] - BLUE).max() <= 16, (other, arr[other])


def test_multi_frame_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (np.asarray(decode_image(data)) == RED).all()


def test_multi_frame_apng_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in (GREEN, RED)]
    data = _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    assert (np.asarray(decode_image(data)) == GREEN).all()


# --- preprocess -----------------------------------------------------------------------------------------------


def _stripes(width: int, height: int) -> Image.Image:
    """Red and blue quarter stripes on the long axis, green in the middle half."""
    img = Image.new("RGB", (width, height), GREEN)
    if width >= height:
        img.paste(RED, (0, 0, width // 4, height))
        img.paste(BLUE, (width - width // 4, 0, width, height))
    else:
        img.paste(RED, (0, 0, width, height // 4))
        img.paste(BLUE, (0, height - height // 4, width, height))
    return img


def test_preprocess_centre_crop_without_resize():
    out = preprocess(_stripes(128, 64), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out == GREEN).all()


@pytest.mark.parametrize(("width", "height"), [(128, 64), (64, 128), (300, 150)])
def test_preprocess_resizes_shorter_side_then_crops_centre(width, height):
    out = preprocess(_stripes(width, height), 32)
    assert out.shape == (32, 32, 3)
    # The crop keeps the green middle half; only bicubic ringing at the crop edge may tint it.
    assert (np.abs(out[4:-4, 4:-4].astype(int) - GREEN) <= 2).all()
    assert np.array_equal(out, preprocess(_stripes(width, height), 32))  # deterministic


def test_preprocess_upscales_and_accepts_any_mode():
    out = preprocess(_gradient(40, 20), 64)
    assert out.shape == (64, 64, 3)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert (preprocess(rgba, 16) == 255).all()  # transparent -> white background
    gray = preprocess(Image.new("L", (24, 16), 77), 16)
    assert gray.shape == (16, 16, 3) and (gray == 77).all()


@pytest.mark.parametrize("size", [30, 0, -8, 12, 8.0, "64", True])
def test_preprocess_rejects_bad_size(size):
    with pytest.raises(ValueError, match=repr(size).replace(".", r"\.")):
        preprocess(Image.new("RGB", (64, 64)), size)


# --- PNG out --------------------------------------------------------------------------------------------------


def test_encode_png_deterministic_and_round_trips():
    pixels = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    text = {"prompt": "a cat \u2014 \u732b", "seed": "42", "model": "sd-1.5"}
    first = encode_png(pixels, text)
    assert first == encode_png(pixels.copy(), dict(reversed(list(text.items()))))
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and b"tIME" not in first
    assert read_png_text(first) == text
    decoded = decode_image(first)
    assert np.array_equal(np.asarray(decoded), pixels)
    assert encode_png(pixels) != first and read_png_text(encode_png(pixels)) == {}


def test_encode_png_accepts_non_contiguous_views():
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    view = pixels[::2, ::-1]
    assert np.array_equal(np.asarray(decode_image(encode_png(view), min_side=1)), view)


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((8, 8), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((8, 8, 4), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), r"shape \(H, W, 3\)"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_encode_png_validates_pixels(pixels, match):
    with pytest.raises(ValueError, match=match):
        encode_png(pixels)


@pytest.mark.parametrize("key", ["", "k" * 80, "caf\u00e9\u732b", "a\0b"])
def test_encode_png_validates_text_keys(key):
    with pytest.raises(ValueError, match="key"):
        encode_png(np.zeros((8, 8, 3), dtype=np.uint8), {key: "v"})


def test_read_png_text_refuses_non_png():
    with pytest.raises(ImageError) as info:
        read_png_text(_save(_gradient(), "JPEG"))
    assert info.value.code == "not_an_image"
