"""Loading a Stable Diffusion 1.x pipeline from a local folder or Hub id: device, dtype, the scheduler check, a
model fingerprint. (Models in object stores are copied to a local folder first: ``model_source``.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: ``--dtype`` names and the torch dtype each one means (by name: torch is imported only where a model is loaded,
#: so that the driver and the command line start without it).
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names the path and the cause."""


class UnsupportedModelError(ModelLoadError):
    """The model loads but the engine would compute wrong results with it (a scheduler setting it does not model)."""


#: Scheduler settings the engine's DDIM maths assumes, with the value it needs and why. Anything else is refused
#: before any UNet call instead of running silently wrong.
REQUIRED_SCHEDULER = {
    "prediction_type": ("epsilon", "the engine's DDIM step reads the UNet's output as the noise (epsilon); "
                                   "v_prediction / sample models (SD 2.x 768 px and others) are not supported"),
    "rescale_betas_zero_snr": (False, "zero-terminal-SNR schedules need v-prediction and trailing timesteps"),
    "thresholding": (False, "dynamic thresholding of x0 is not part of the engine's DDIM step"),
    "clip_sample": (False, "clipping x0 breaks the invertibility DDIM inversion relies on"),
}


def check_scheduler_config(config: dict[str, Any]) -> None:
    """Refuse a scheduler config the engine would run wrong, naming the setting (before any work)."""
    for name, (wanted, why) in REQUIRED_SCHEDULER.items():
        value = config.get(name, wanted)
        if value != wanted:
            raise UnsupportedModelError(f"the model's scheduler sets {name}={value!r}; ddim-edit needs "
                                        f"{name}={wanted!r}: {why}")


def choose_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (fp16 where bf16 is not supported), fp32 elsewhere, where half precision is slow."""
    import torch

    if dtype == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype_name_without_cuda(dtype))


def dtype_name_without_cuda(dtype: str) -> str:
    """What ``--dtype`` means on a device without CUDA (``auto``: float32), by name, without importing torch."""
    if dtype == "auto":
        return "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()


def hub_snapshot(model: str, revision: str | None = None) -> tuple[str, str]:
    """(resolved commit, local folder of model_index.json and the scheduler config) of a Hub model.

    Asks the Hub which commit ``revision`` (default: main) is, and fetches only the two small configs; with no network
    (or ``HF_HUB_OFFLINE=1``) a copy already in the Hugging Face cache is used. Raises ``ModelLoadError`` naming the
    model when neither works.
    """
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "scheduler/scheduler_config.json"]
    try:
        folder = snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as online:  # noqa: BLE001 - no network, unknown repo, gated repo: try the local cache
        try:
            folder = snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True)
        except Exception:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot resolve model {model!r}{f' at revision {revision!r}' if revision else ''} on the Hugging Face "
                f"Hub ({type(online).__name__}: {str(online).splitlines()[0][:200]}); give a local diffusers folder "
                "or an s3:// URL, or check the network, HF_TOKEN and the model id") from None
    return Path(folder).name, folder


def check_model(model: str, revision: str | None = None) -> str | None:
    """Fail fast, before any worker starts: a missing local folder or Hub model, one that is not a diffusers pipeline,
    or one whose scheduler the engine would run wrong. Returns the resolved Hub commit for Hub ids, else None.
    (Object-store folders: ``model_source.check_model``.)"""
    if _looks_like_path(model):
        path = Path(model.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model folder {model!r} does not exist (give a local folder, an s3:// URL or a "
                                 "hub id)")
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"model folder {model!r} has no model_index.json: not a diffusers pipeline folder")
        config = path / "scheduler" / "scheduler_config.json"
        check_scheduler_config(json.loads(config.read_text()) if config.exists() else {})
        return None
    commit, folder = hub_snapshot(model, revision)
    config = Path(folder) / "scheduler" / "scheduler_config.json"
    check_scheduler_config(json.loads(config.read_text()) if config.exists() else {})
    return commit


def model_fingerprint(model: str, revision: str | None = None, hub_commit: str | None = None) -> str:
    """A short hash that changes when the model does: configs and weight file names and sizes (not their bytes,
    which would mean reading gigabytes). Hub ids are fingerprinted by their resolved commit, so a new revision of
    the model never reuses latents cached for the old one. ``model``: a local folder or a Hub id."""
    path = Path(model.removeprefix("file://")).expanduser()
    if not path.is_dir():
        commit = hub_commit or hub_snapshot(model, revision)[0]
        return hashlib.sha256(f"hub:{model}@{commit}".encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(rel.encode())
        if file.suffix in {".json", ".txt"}:
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, *, revision: str | None = None,
                  variant: str | None = None) -> Any:
    """``StableDiffusionPipeline.from_pretrained`` on a local folder or Hub id, moved to device (object-store
    folders are copied to a local folder first: ``model_source.local_model_path``)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Workers' output reaches the driver's log: no loading progress bars there.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    source = model.removeprefix("file://")
    check_model(source, revision=revision)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False, revision=revision,
            variant=variant,
        )
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError variously
        raise ModelLoadError(f"cannot load model {model!r}: {type(exc).__name__}: {exc}") from exc
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe
