"""Loading a Stable Diffusion 1.x pipeline once: device, dtype, remote model folders, and a model fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Where models given as object-store URLs (``s3://bucket/sd15``) are copied before ``from_pretrained``.
MODEL_CACHE_DIR = Path(os.environ.get("DDIM_EDIT_MODEL_CACHE", Path.home() / ".cache" / "ddim-edit" / "models"))

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names the path and the cause."""


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (fp16 where bf16 is not supported), fp32 on CPU where half precision is slow."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _is_remote(model: str) -> bool:
    return "://" in model and not model.startswith("file://")


def local_model_path(model: str, storage_options: dict | None = None) -> str:
    """A path or hub id ``from_pretrained`` can read: object-store folders are copied to ``MODEL_CACHE_DIR`` once."""
    if not _is_remote(model):
        return model.removeprefix("file://")
    import fsspec

    target = MODEL_CACHE_DIR / hashlib.sha256(model.encode()).hexdigest()[:16]
    if not (target / "model_index.json").exists():
        fs, root = fsspec.core.url_to_fs(model, **(storage_options or {}))
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        log.info("copying model %s to %s", model, target)
        fs.get(root.rstrip("/") + "/", str(partial), recursive=True)
        os.replace(partial, target)
    return str(target)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()


def check_model(model: str, storage_options: dict | None = None) -> None:
    """Fail fast, before any worker starts, when a model folder is missing or is not a diffusers pipeline."""
    if _is_remote(model):
        import fsspec

        fs, root = fsspec.core.url_to_fs(model, **(storage_options or {}))
        try:
            found = fs.exists(root.rstrip("/") + "/model_index.json")
        except Exception as exc:  # noqa: BLE001 - credentials, endpoint, bucket errors
            raise ModelLoadError(f"cannot reach model {model!r}: {type(exc).__name__}: {exc}") from exc
        if not found:
            raise ModelLoadError(f"model {model!r} has no model_index.json: not a diffusers pipeline folder")
        return
    if _looks_like_path(model):
        path = Path(model.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model folder {model!r} does not exist (give a local folder, an s3:// URL or a "
                                 "hub id)")
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"model folder {model!r} has no model_index.json: not a diffusers pipeline folder")


def model_fingerprint(model: str, storage_options: dict | None = None) -> str:
    """A short hash that changes when the model does: configs and weight file names and sizes (not their bytes,
    which would mean reading gigabytes). Hub ids without a local copy are fingerprinted by name."""
    path = Path(local_model_path(model, storage_options))
    if not path.is_dir():
        return hashlib.sha256(f"hub:{model}".encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(rel.encode())
        if file.suffix in {".json", ".txt"}:
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, storage_options: dict | None = None) -> Any:
    """``StableDiffusionPipeline.from_pretrained`` on a local folder, hub id or object-store URL, moved to device."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    source = local_model_path(model, storage_options)
    check_model(source)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError variously
        raise ModelLoadError(f"cannot load model {model!r}: {type(exc).__name__}: {exc}") from exc
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


def scheduler_config(pipe: Any) -> dict[str, Any]:
    return dict(json.loads(json.dumps(dict(pipe.scheduler.config), default=str)))
