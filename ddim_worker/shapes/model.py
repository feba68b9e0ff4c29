"""The shipped shapes model: ``make_shapes_model(path)`` writes it as a diffusers ``StableDiffusionPipeline`` folder.

The weights live in this package (``weights/``, safetensors) and are copied, not trained: about a second.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parent / "weights"
SETTINGS_FILE = "edit_settings.json"
COMPONENTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def shipped_weights() -> Path:
    if not (WEIGHTS / "model_index.json").exists():
        raise FileNotFoundError(f"the shapes model's weights are missing from {WEIGHTS}")
    return WEIGHTS


def make_shapes_model(path: str | os.PathLike) -> Path:
    """Write the shipped shapes model at ``path`` (a diffusers folder); skipped if a model is already there."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    src = shipped_weights()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (*COMPONENTS, SETTINGS_FILE, "README.md"):
        item = src / name
        if item.is_dir():
            shutil.copytree(item, tmp / name)
        elif item.exists():
            shutil.copy2(item, tmp / name)
    (tmp / "ddim_edit_arch.json").write_text(json.dumps({"arch": "shapes", "size": 64}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def edit_settings() -> dict[str, Any]:
    """The recommended edit settings for the shapes model (measured by ``edit_bench``, see docs/quality.md)."""
    return json.loads((shipped_weights() / SETTINGS_FILE).read_text())
