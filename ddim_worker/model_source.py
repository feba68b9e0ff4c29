"""Models named by any URL a user gives (local folder, Hub id, ``s3://`` or another fsspec folder): object-store
folders are copied to a local cache once per node, then loaded and fingerprinted as local folders (``models``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ddim_worker.core import models
from ddim_worker.core.models import ModelLoadError, check_scheduler_config

log = logging.getLogger(__name__)

#: Where models given as object-store URLs (``s3://bucket/sd15``) are copied before ``from_pretrained``.
MODEL_CACHE_DIR = Path(os.environ.get("DDIM_EDIT_MODEL_CACHE", Path.home() / ".cache" / "ddim-edit" / "models"))


def is_remote(model: str) -> bool:
    return "://" in model and not model.startswith("file://")


def local_model_path(model: str, storage_options: dict | None = None, marker: str = "model_index.json") -> str:
    """A path or hub id ``from_pretrained`` can read: object-store folders are copied to ``MODEL_CACHE_DIR`` once
    (``marker``: the file whose presence says a copy is complete; a CLIP scorer's is ``config.json``)."""
    if not is_remote(model):
        return model.removeprefix("file://")
    import fsspec

    from filelock import FileLock

    target = MODEL_CACHE_DIR / hashlib.sha256(model.encode()).hexdigest()[:16]
    if (target / marker).exists():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Several engine actors on one node load the same model: one copies, the others wait for it, then find it.
        with FileLock(str(target) + ".lock"):
            if not (target / marker).exists():
                fs, root = fsspec.core.url_to_fs(model, **(storage_options or {}))
                partial = target.with_name(target.name + f".partial-{os.getpid()}")
                log.info("copying model %s to %s", model, target)
                fs.get(root.rstrip("/") + "/", str(partial), recursive=True)
                os.replace(partial, target)
    except OSError as exc:  # this node cannot hold the copy (disk full, read-only cache folder)
        raise ModelLoadError(f"cannot load model {model!r}: copying it to {MODEL_CACHE_DIR} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    return str(target)


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def check_model(model: str, storage_options: dict | None = None, revision: str | None = None) -> str | None:
    """Fail fast, before any worker starts (``models.check_model``), for object-store folders too: reading only
    ``model_index.json`` and the scheduler config. Returns the resolved Hub commit for Hub ids, else None."""
    if not is_remote(model):
        return models.check_model(model.removeprefix("file://"), revision)
    import fsspec

    fs, root = fsspec.core.url_to_fs(model, **(storage_options or {}))
    root = root.rstrip("/")
    try:
        found = fs.exists(root + "/model_index.json")
        scheduler = _read_json(fs, root + "/scheduler/scheduler_config.json") if found else None
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint, bucket errors
        raise ModelLoadError(f"cannot reach model {model!r}: {type(exc).__name__}: {exc}") from exc
    if not found:
        raise ModelLoadError(f"model {model!r} has no model_index.json: not a diffusers pipeline folder")
    check_scheduler_config(scheduler or {})
    return None


def model_fingerprint(model: str, storage_options: dict | None = None, revision: str | None = None,
                      hub_commit: str | None = None) -> str:
    """``models.model_fingerprint`` of the model's local copy (object-store folders are copied first)."""
    return models.model_fingerprint(local_model_path(model, storage_options), revision, hub_commit)


def check_scorer(scorer: str, storage_options: dict | None = None) -> tuple[str, str | None]:
    """(the scorer as the actors load it, its fingerprint), before Ray starts: a folder (local, or an object-store
    folder, copied once like a model) must hold a CLIP model's ``config.json`` (``model_type`` ``clip``). A Hub id is
    passed on as it is (fingerprinted by name; the actors resolve it). Raises ``ModelLoadError`` in one line."""
    if not is_remote(scorer):
        folder = Path(scorer.removeprefix("file://")).expanduser()
        if not folder.exists():
            if scorer.count("/") == 1 and not scorer.startswith((".", "/", "~")):
                return scorer, hashlib.sha256(f"hub:{scorer}".encode()).hexdigest()[:16]
            raise ModelLoadError(f"scorer {scorer!r}: no such folder")
        scorer = str(folder.resolve())
    local = Path(local_model_path(scorer, storage_options, marker="config.json"))
    try:
        kind = json.loads((local / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        raise ModelLoadError(f"scorer {scorer!r} has no config.json: not a transformers CLIP folder") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"scorer {scorer!r}: unreadable config.json ({exc})") from None
    if kind != "clip":
        raise ModelLoadError(f"scorer {scorer!r} is a {kind!r} model, not CLIP (model_type 'clip')")
    return scorer, models.model_fingerprint(str(local))
