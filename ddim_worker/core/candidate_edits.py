"""A row's candidates as engine requests, and their outputs back as the row's one result (``core.candidates``).

``expand`` turns a row into the engine rows of its candidates (the same image, prompts and inversion settings, so
the engine inverts once and samples one source branch for all); ``combine`` makes the row's output of the chosen
candidate, charged with the work of all of them (passes add up: the results' ``ideal_unet_samples`` stays what the
row cost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ddim_worker.core.candidates import KeptCandidate, Scores, Thresholds, candidate_settings, select
from ddim_worker.core.edit_types import EditOutput, EditRow

#: The work counters of an output that add up over a row's candidates.
PASS_FIELDS = ("inversion_passes", "sampling_passes", "source_passes", "mask_passes")


def expand(row: EditRow, row_key: str) -> list[EditRow]:
    """The engine rows of ``row``'s candidates (itself alone when it has one and draws nothing)."""
    settings = row.settings
    if settings.candidates == 1 and not (settings.sample_cross_replace or settings.sample_self_replace):
        return [row]
    return [EditRow.from_settings(row.image, row.source_prompt, row.edit_prompt, drawn, cached=row.cached)
            for drawn in candidate_settings(settings, row_key)]


def combine(rows: Sequence[EditRow], outputs: Sequence[EditOutput], scores: Sequence[Scores] | None,
            thresholds: Thresholds, keep: bool = False) -> EditOutput:
    """The row's output: the selected candidate (``candidates.select``; without scores the first), with every
    candidate's passes, its index, its control fractions, its scores and the filter's verdict; with ``keep`` and
    more than one candidate, every candidate too (``--keep-candidates``)."""
    best, passed = select(scores, thresholds) if scores is not None else (0, True)
    chosen = outputs[best]
    work = {name: sum(getattr(out, name) for out in outputs) for name in PASS_FIELDS}
    kept = tuple(KeptCandidate(k, out.image, float(row.cross_replace), float(row.self_replace),
                               scores[k] if scores is not None else None,
                               thresholds.passes(scores[k]) if scores is not None else True)
                 for k, (row, out) in enumerate(zip(rows, outputs))) if keep and len(outputs) > 1 else ()
    return dataclasses.replace(chosen, **work, candidate=best, cross_replace=float(rows[best].cross_replace),
                               self_replace=float(rows[best].self_replace),
                               scores=scores[best] if scores is not None else None, passed=passed,
                               kept_candidates=kept)
