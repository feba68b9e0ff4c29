"""The job's CPU stages as plain batch functions (dict of NumPy arrays in and out), testable without Ray.

``prepare_batch`` fetches, decodes and preprocesses images and looks up the latent cache, so the GPU actors never
wait on the network; ``write_batch`` encodes PNGs and writes images and new latents. Neither ever raises for one
row: a row that fails gets ``status = failed`` with a stable ``error_code``, and its neighbours go on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddim_worker import latent_cache, storage
from ddim_worker.fetch import fetch_bytes
from ddim_worker.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageError, decode_image, encode_png, preprocess
from ddim_worker.inversion import parse_method
from ddim_worker.manifest import ManifestFiles, read_embedded_image
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, OK, RESULT_SETTING_FIELDS, RowError
from ddim_worker.url_policy import FetchError, FetchPolicy

PENDING = ""  # status of a row still in flight


@dataclass(frozen=True)
class StageContext:
    """What the CPU stages need to know about the job; built once by the driver and shipped to every task."""

    layout: OutputLayout
    manifest: ManifestFiles | None
    model: str
    model_fingerprint: str
    dtype: str
    size: int
    image_column: str | None = None  # the manifest's embedded-image column, if it has one
    storage_options: dict = field(default_factory=dict)
    policy: FetchPolicy = FetchPolicy()
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE

    def image_uri(self, row_id: str) -> str:
        return self.layout.edited(row_id)


def _column(batch: dict[str, np.ndarray], name: str, n: int, default: Any = None) -> list:
    return list(batch[name]) if name in batch else [default] * n


def _fail(out: dict[str, list], i: int, code: str, message: str) -> None:
    out["status"][i], out["error_code"][i], out["error"][i] = FAILED, code, message


def _fetch_image(row: dict, ctx: StageContext, groups: dict) -> bytes:
    if row.get("ref_file", -1) is not None and int(row.get("ref_file", -1)) >= 0:
        ref = (int(row["ref_file"]), int(row["ref_group"]), int(row["ref_row"]))
        key = ref[:2]
        if key not in groups:  # one row-group read per batch, not one per row
            groups[key] = {}
        if ref not in groups[key]:
            groups[key][ref] = read_embedded_image(ctx.manifest, ref, ctx.image_column, ctx.storage_options)
        return groups[key].pop(ref)
    url = row.get("image_url")
    if not isinstance(url, str) or not url.strip():
        raise RowError("bad_setting", "the row has no image: image_url is empty and no embedded image bytes")
    return fetch_bytes(url.strip(), base_dir=ctx.manifest.base_uri if ctx.manifest.is_local else None,
                       base_uri=ctx.manifest.base_uri, policy=ctx.policy, storage_options=ctx.storage_options)


def cache_key(ctx: StageContext, pixels: np.ndarray, row: dict) -> latent_cache.CacheKey:
    method = parse_method(str(row["inversion"])).cache_key(float(row["guidance_scale"]))
    return latent_cache.CacheKey(
        image_sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
        source_prompt=row["source_prompt"],
        negative_prompt=row["negative_prompt"] or "",
        model_fingerprint=ctx.model_fingerprint,
        num_steps=int(row["num_steps"]),
        inversion_guidance=float(row["inversion_guidance"]),
        size=ctx.size,
        dtype=ctx.dtype,
        method=method,
    )


def prepare_batch(batch: dict[str, np.ndarray], ctx: StageContext) -> dict[str, np.ndarray]:
    """Fetch + decode + preprocess each row's image and read its cached trajectory, if any (CPU, network)."""
    n = len(batch["id"])
    names = list(batch)
    out: dict[str, list] = {
        "status": [PENDING] * n, "error_code": [None] * n, "error": [None] * n, "cache_uri": [None] * n,
        "cache_blob": [b""] * n, "prepare_seconds": [0.0] * n,
    }
    pixels = np.zeros((n, ctx.size, ctx.size, 3), dtype=np.uint8)
    groups: dict = {}
    for i in range(n):
        started = time.perf_counter()
        row = {name: batch[name][i] for name in names}
        try:
            data = _fetch_image(row, ctx, groups)
            image = decode_image(data, max_pixels=ctx.max_pixels, min_side=ctx.min_side)
            pixels[i] = preprocess(image, ctx.size)
            key = cache_key(ctx, pixels[i], row)
            out["cache_uri"][i] = latent_cache.cache_uri(ctx.layout.latents, key)
            try:
                out["cache_blob"][i] = storage.read_bytes(out["cache_uri"][i], ctx.storage_options)
            except (FileNotFoundError, OSError):
                pass  # a miss: the actor inverts
        except (FetchError, ImageError, RowError) as exc:
            _fail(out, i, exc.code, getattr(exc, "message", None) or str(exc))
        except Exception as exc:  # noqa: BLE001 - any other surprise still fails only this row
            _fail(out, i, "fetch_failed", f"{type(exc).__name__}: {exc}")
        out["prepare_seconds"][i] = time.perf_counter() - started
    result = {name: batch[name] for name in names}
    result.update({k: np.array(v, dtype=object) for k, v in out.items()})
    result["prepare_seconds"] = np.array(out["prepare_seconds"], dtype=np.float64)
    result["pixels"] = pixels
    return result


def png_text(row: dict, ctx: StageContext) -> dict[str, str]:
    """What a PNG says about how it was made (tEXt chunks): prompts, settings, model."""
    return {
        "ddim_edit:id": str(row["id"]),
        "ddim_edit:source_prompt": str(row["source_prompt"]),
        "ddim_edit:edit_prompt": str(row["edit_prompt"]),
        "ddim_edit:negative_prompt": str(row["negative_prompt"] or ""),
        "ddim_edit:settings": " ".join([*(f"{name}={row[name]}" for name in SETTINGS_IN_PNG),
                                        f"size={ctx.size}", f"dtype={ctx.dtype}"]),
        "ddim_edit:model": f"{ctx.model} ({ctx.model_fingerprint})",
    }


#: The settings a PNG's ``ddim_edit:settings`` text lists (the prompts have chunks of their own).
SETTINGS_IN_PNG = tuple(name for name in RESULT_SETTING_FIELDS if name != "negative_prompt")

RESULT_FIELDS = ("id", "image_url", "source_prompt", "edit_prompt", *RESULT_SETTING_FIELDS, "manifest_row")


def write_batch(batch: dict[str, np.ndarray], ctx: StageContext) -> dict[str, np.ndarray]:
    """Write each finished row's latents (if new) then its PNG; the PNG last, so its presence means "done"."""
    n = len(batch["id"])
    names = list(batch)
    results: dict[str, list] = {k: [] for k in (*RESULT_FIELDS, "dtype", "status", "error_code", "error", "output_uri",
                                                "latent_uri", "cache_hit", "inversion_passes", "sampling_passes",
                                                "unet_passes", "seconds", "psnr", "ssim", "latent_mse")}
    for i in range(n):
        row = {name: batch[name][i] for name in names}
        started = time.perf_counter()
        status, code, error = row["status"] or PENDING, row.get("error_code"), row.get("error")
        output_uri = latent_uri = None
        if status == PENDING:
            try:
                blob = row.get("trajectory_blob")
                latent_uri = row.get("cache_uri")
                if blob is not None and len(blob):
                    storage.write_bytes(latent_uri, bytes(blob), ctx.storage_options)
                rid = str(row["id"])
                if row.get("pixels") is not None:  # the preprocessed input, for the report and audits
                    storage.write_bytes(ctx.layout.image("input", rid), encode_png(np.asarray(row["pixels"])),
                                        ctx.storage_options)
                if row.get("reconstruction") is not None:
                    storage.write_bytes(ctx.layout.image("reconstruction", rid),
                                        encode_png(np.asarray(row["reconstruction"])), ctx.storage_options)
                output_uri = ctx.image_uri(rid)
                storage.write_bytes(output_uri, encode_png(np.asarray(row["edited"]), png_text(row, ctx)),
                                    ctx.storage_options)
                status = OK
            except Exception as exc:  # noqa: BLE001 - a failed write fails this row only
                status, code, error = FAILED, "write_failed", f"{type(exc).__name__}: {exc}"
                output_uri = None
        for name in RESULT_FIELDS:
            value = row.get(name)
            results[name].append(value.item() if isinstance(value, np.generic) else value)
        inversion_passes = int(row.get("inversion_passes", 0) or 0)
        sampling_passes = int(row.get("sampling_passes", 0) or 0)
        results["dtype"].append(ctx.dtype)
        results["status"].append(status)
        results["error_code"].append(code if status == FAILED else None)
        results["error"].append(error if status == FAILED else None)
        results["output_uri"].append(output_uri)
        results["latent_uri"].append(latent_uri if status == OK else None)
        results["cache_hit"].append(bool(row.get("cache_hit", False)) if status == OK else False)
        results["inversion_passes"].append(inversion_passes)
        results["sampling_passes"].append(sampling_passes)
        results["unet_passes"].append(inversion_passes + sampling_passes)
        for name in ("psnr", "ssim", "latent_mse"):
            value = row.get(name)
            results[name].append(float(value) if value is not None and status == OK else None)
        results["seconds"].append(float(row.get("prepare_seconds", 0.0) or 0.0)
                                  + float(row.get("engine_seconds", 0.0) or 0.0)
                                  + time.perf_counter() - started)
    return {k: np.array(v, dtype=object) for k, v in results.items()}
