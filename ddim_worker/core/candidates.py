"""Candidates of a row: K edits that share its inversion and its source branch, each with its own attention control.

InstructPix2Pix made its training pairs this way: many Prompt-to-Prompt edits per caption pair, the replacement
fraction drawn at random, and only those a CLIP filter passes kept. Here a row with ``candidates`` K is edited K
times; candidate k draws ``cross_replace`` / ``self_replace`` from the row's ranges (``sample_cross_replace``,
``sample_self_replace``) with a generator seeded from the row's id and seed, so a rerun draws the same. The draws
change only the edit branches: every candidate has the row's image, prompts and inversion settings, so the engine
inverts the image once and samples one source branch for all of them (``source_key`` ignores the fractions). With
eta > 0 each candidate takes its own noise seed (``seed + k``), and with it a source branch of its own.

Pure: no model, no torch. ``select`` picks the row's result from the candidates' scores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ddim_worker.core.settings import EditSettings, parse_span

#: Draws are rounded to this many decimals: the records stay readable, and the steps a fraction controls
#: (``floor(f * (n - s))``) do not change at this resolution for any n - s <= 100.
DRAW_DECIMALS = 3


def candidate_settings(settings: EditSettings, row_key: str) -> list[EditSettings]:
    """The settings of each of the row's ``candidates`` edits, each a single edit (``candidates`` 1, no ranges).

    ``row_key``: the row's id (what a rerun finds the row by). Candidate 0 of a row without ranges is the row itself.
    """
    count = int(settings.candidates)
    spans = {name: parse_span(f"sample_{name}", getattr(settings, f"sample_{name}"))
             for name in ("cross_replace", "self_replace")}
    seed = int.from_bytes(hashlib.sha256(f"{row_key}\x1f{settings.seed}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    draws = {name: rng.uniform(span[0], span[1], count) if span else None for name, span in spans.items()}
    out = []
    for k in range(count):
        changes = {name: round(float(values[k]), DRAW_DECIMALS) for name, values in draws.items()
                   if values is not None}
        if float(settings.eta) > 0:
            changes["seed"] = (int(settings.seed) + k) % 2**63
        out.append(settings.replace(candidates=1, sample_cross_replace="", sample_self_replace="", **changes))
    return out


@dataclass(frozen=True)
class Scores:
    """A candidate's CLIP scores (``core.scorer``), all cosine similarities in [-1, 1]."""

    direction: float  # image change (edited - input) vs text change (edit - source prompt)
    image_similarity: float  # edited image vs input image
    text_similarity: float  # edited image vs edit prompt


@dataclass(frozen=True)
class KeptCandidate:
    """One candidate of a row as ``--keep-candidates`` writes it: its index, image, draws, scores and verdict."""

    candidate: int
    image: np.ndarray  # (H, W, 3) uint8
    cross_replace: float
    self_replace: float
    scores: Scores | None
    passed: bool


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must reach to pass (InstructPix2Pix's filter; see docs/quality.md)."""

    direction: float = 0.2
    image_similarity: float = 0.7
    text_similarity: float = 0.2

    def passes(self, scores: Scores) -> bool:
        return (scores.direction >= self.direction and scores.image_similarity >= self.image_similarity
                and scores.text_similarity >= self.text_similarity)


def select(scores: Sequence[Scores], thresholds: Thresholds) -> tuple[int, bool]:
    """(the candidate that is the row's result, whether it passed): the passing candidate with the highest
    directional similarity (the change that follows the prompts' change most), else the highest of all."""
    if not scores:
        raise ValueError("no candidates to select from")
    passing = [k for k, s in enumerate(scores) if thresholds.passes(s)]
    pool = passing or list(range(len(scores)))
    best = max(pool, key=lambda k: (scores[k].direction, -k))
    return best, bool(passing)
