"""The shipped shapes scorer: ``make_shapes_scorer(path)`` writes it as a transformers CLIP folder (``CLIPModel`` and
``CLIPProcessor``), for ``ddim-edit run --scorer PATH`` on the shapes model's edits.

The weights live in this package (``scorer_weights/``, safetensors, with the training log and the model card) and are
copied, not trained: well under a second. ``ddim-edit train-shapes-scorer PATH`` trains them again (``train_scorer``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SCORER_WEIGHTS = Path(__file__).resolve().parent / "scorer_weights"


def make_shapes_scorer(path: str | os.PathLike) -> Path:
    """Write the shipped shapes scorer at ``path``; skipped if a CLIP folder is already there."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if not (SCORER_WEIGHTS / "config.json").exists():
        raise FileNotFoundError(f"the shapes scorer's weights are missing from {SCORER_WEIGHTS}")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(SCORER_WEIGHTS, tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
