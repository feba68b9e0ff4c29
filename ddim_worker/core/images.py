"""Image bytes in, model-ready pixels out, and PNG bytes back: pure functions over Pillow and NumPy.

Nothing here touches the network, Ray or torch, so every rule about what an input image may be (size limits,
corrupt data, odd modes, EXIF rotation) is decided and tested in one place. Every refusal is an :class:`ImageError`
with a stable ``code`` the job can count and report per row, instead of a crash that takes down a batch.
"""

from __future__ import annotations

import io
import operator
import re
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

# Refuse decompression bombs from the header, before any pixel is decoded: a 64 MP RGB image is ~190 MB of pixels,
# enough for any real photo, while a tiny compressed file can claim billions of pixels and exhaust worker memory.
DEFAULT_MAX_PIXELS = 64_000_000
# Below this the VAE's 8x downsampling leaves (almost) no latent to edit; such inputs are icons or tracking pixels.
DEFAULT_MIN_SIDE = 16
# Transparent pixels are composited on white: the model has no alpha channel and black reads as content.
DEFAULT_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_PILLOW_SIZE = re.compile(r"Image size \((\d+) pixels\)")


class ImageError(ValueError):
    """An input image the job refuses; ``code`` is one of ``not_an_image``, ``bad_image``, ``too_large``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Decode untrusted bytes into an upright 8-bit RGB image, or raise :class:`ImageError`.

    The size is checked from the header before decoding, so a bomb costs only its header. Pillow's own
    ``DecompressionBombWarning`` is silenced (our limit decides) and its ``DecompressionBombError`` (over
    ``2 * Image.MAX_IMAGE_PIXELS``, a hard ceiling even when ``max_pixels`` is higher) becomes ``too_large``.
    Truncated data is an error: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never turned on here.
    """
    if not data:
        raise ImageError("not_an_image", "image is empty (0 bytes)")
    # Note: catch_warnings swaps process-wide state; that only matters for warnings other threads emit meanwhile.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                _check_size(img.size, max_pixels, min_side)
                img.seek(0)  # multi-frame (GIF, APNG, TIFF): the first frame is the image
                img.load()
                upright = ImageOps.exif_transpose(img)
                return _to_rgb(upright, background)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", _bomb_message(data, exc, max_pixels)) from exc
        except UnidentifiedImageError as exc:
            raise ImageError("not_an_image", f"not an image format Pillow can read ({len(data)} bytes)") from exc
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders of untrusted data raise OSError, SyntaxError, struct.error...
            raise ImageError("bad_image", f"image data is truncated or corrupt: {type(exc).__name__}: {exc}") from exc


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    """Apply the header-only limits (``too_large`` first: a 1 x 10**9 image is a bomb, not merely thin)."""
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (--max-pixels)",
        )
    if min(width, height) < min_side:
        raise ImageError("bad_image", f"image is {width}x{height}, smaller than the minimum side {min_side}")


def _bomb_message(data: bytes, exc: Exception, max_pixels: int) -> str:
    """Say how big the image Pillow refused claims to be, as ``WxH`` when the header can be read without its check."""
    size = _header_size(data)
    if size is not None:
        width, height = size
        claim = f"{width}x{height} = {width * height} pixels"
    else:
        match = _PILLOW_SIZE.search(str(exc))
        claim = f"{match.group(1)} pixels" if match else "too many pixels"
    ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    limit = f"{max_pixels} (--max-pixels)" if max_pixels <= ceiling else f"{ceiling} (Pillow's hard limit)"
    return f"image is {claim}, over the limit of {limit}"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Read the claimed size with Pillow's registered openers, which parse only the header (no bomb check there)."""
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = True if accept is None else accept(prefix)
            if isinstance(accepted, str) or not accepted:  # Pillow's accept() returns a str to mean "no, but warn"
                continue
            with factory(io.BytesIO(data), "") as img:
                return img.size
        except Exception:  # noqa: BLE001 - best effort, for an error message only
            continue
    return None


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited on ``background``, high bit depths scaled, not clipped."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # P/L/RGB with a tRNS chunk become RGBA through Pillow's convert, which turns the key colour into alpha.
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, P, CMYK (incl. Adobe inverted), YCbCr, ...


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Scale integer (16/32-bit) or float single-channel pixels to uint8 by their nominal range."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0  # 0..1 float images (HDR/linear exports)
    elif img.mode.startswith("I;16") or (arr.size and arr.min() >= 0 and arr.max() <= 65535):
        arr = arr / 257.0  # 16-bit: 65535 -> 255, 32768 -> 128 (mode "I" is how Pillow often holds 16-bit PNG)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop: uint8 ``(size, size, 3)`` for the VAE.

    ``size`` must be a positive multiple of 8 because the VAE downsamples by 8; anything else would be silently
    cropped again downstream.
    """
    try:
        side = operator.index(size)
    except TypeError:
        raise ValueError(f"size must be a positive multiple of 8, got {size!r}") from None
    if isinstance(size, bool) or side <= 0 or side % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size!r}")
    img = _to_rgb(image, DEFAULT_BACKGROUND)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image is {width}x{height}, cannot preprocess an empty image")
    scale = side / min(width, height)
    new_w = side if width <= height else max(side, round(width * scale))
    new_h = side if height < width else max(side, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - side) // 2, (new_h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    out = np.asarray(img, dtype=np.uint8)
    assert out.shape == (side, side, 3), out.shape
    return out


def encode_png(pixels: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """Encode uint8 ``HxWx3`` pixels as PNG with ``text`` as tEXt (Latin-1) or iTXt (other) chunks.

    Deterministic, so reruns produce byte-identical outputs (cacheable, diffable): no timestamp chunk, a fixed
    compression level, and text entries written in sorted key order.
    """
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must have dtype uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"pixels must have shape (H, W, 3) with H, W > 0, got {pixels.shape}")
    info = PngImagePlugin.PngInfo()
    for key in sorted(text or {}):
        value = text[key]  # type: ignore[index]
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"PNG text keys and values must be str, got {key!r}: {type(value).__name__}")
        if not 1 <= len(key) <= 79 or "\0" in key or not key.isprintable() or not _is_latin1(key):
            raise ValueError(f"PNG text key must be 1-79 printable Latin-1 characters, got {key!r}")
        info.add_text(key, value)  # Pillow falls back to iTXt (UTF-8) when the value is not Latin-1
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a uint8 ``HxW`` mask (255: the edited region) as a grayscale PNG, deterministically."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"a mask must be a uint8 (H, W) array, got {getattr(mask, 'dtype', type(mask))} "
                         f"{getattr(mask, 'shape', '')}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _is_latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def read_png_text(data: bytes) -> dict[str, str]:
    """Return the tEXt/zTXt/iTXt entries of PNG bytes (how job outputs record their provenance)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            return {str(k): str(v) for k, v in img.text.items()}
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", f"not PNG data ({len(data)} bytes)") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt chunks raise OSError, SyntaxError, zlib.error...
        raise ImageError("bad_image", f"PNG data is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
