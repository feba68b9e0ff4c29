"""The plan of an engine group's UNet calls: pure and model-free, so tests read it without a model.

A *sampling call* carries branches, one latent each, and the UNet runs every branch once per CFG half:

    guided call of P branches (padded to P = batch size):  [uncond 0 .. uncond P-1 ; text 0 .. text P-1]
    unguided call:                                          [text 0 .. text P-1]

An *edit* branch samples one row with its edit prompt. A *source* branch samples an image with its source prompt
beside that image's edit branches, so they can read its attention maps (Prompt-to-Prompt) or its trajectory (direct
inversion). Rows that agree on a ``source_key`` share one source branch: an image with K edit prompts costs one
inversion and one source branch. A unit (a source branch and its edits) never spans two calls unless it is larger
than a call; then every piece carries its own copy of the source branch, computed to the same bytes.

Calls hold only guided or only unguided rows, and every call is padded to the batch size, so the shape of a row's
calls and its bytes depend on the row alone, never on its neighbours.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowNeeds:
    """What the planner knows about one row."""

    guided: bool  # sampling guidance != 1: the row's calls run both CFG halves
    source_key: Hashable | None = None  # rows with equal keys share a source branch; None: the row needs none


@dataclass(frozen=True)
class Branch:
    """One latent of a sampling call."""

    row: int  # the row this branch edits; for a source branch, the first row of its unit (its image and prompts)
    is_source: bool = False
    source: int | None = None  # edit branches of a unit: the index, in the call, of the source branch they read


@dataclass(frozen=True)
class SamplingCall:
    """One UNet call layout, run at every sampling step of its branches."""

    branches: tuple[Branch, ...]
    guided: bool
    pad_to: int | None  # rows per CFG half after padding (None: no padding)
    # Inversions that run in this call's free rows, one row each, in step with the sampling: the row that leads each
    # (its image, source prompt and inversion settings). They fill what would be padding (``plan_sampling``).
    riders: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Rows per CFG half, padding included."""
        return max(self.pad_to or 0, len(self.branches) + len(self.riders))

    @property
    def shape(self) -> tuple[int | None, bool]:
        """What the denoiser runs (``model_adapter.Layout``): (rows per CFG half after padding, both halves)."""
        return self.pad_to, self.guided

    @property
    def unet_rows(self) -> int:
        """UNet samples per step: the padded size, doubled when guided."""
        return self.size * (2 if self.guided else 1)

    @property
    def edits(self) -> list[int]:
        """Indices (in the call) of the edit branches."""
        return [j for j, b in enumerate(self.branches) if not b.is_source]

    def layout(self) -> list[str]:
        """The UNet batch, row by row: ``"uncond:edit 3"``, ``"text:source 0"``, ``"text:pad"``."""
        names = [f"{'source' if b.is_source else 'edit'} {b.row}" for b in self.branches]
        names += [f"invert {i}" for i in self.riders]
        names += ["pad"] * (self.size - len(names))
        halves = ("uncond", "text") if self.guided else ("text",)
        return [f"{half}:{name}" for half in halves for name in names]


def _units(needs: Sequence[RowNeeds], index: list[int]) -> list[list[int]]:
    """Rows grouped into units, in order of first appearance: rows sharing a source key together, others alone."""
    units: list[list[int]] = []
    by_key: dict[Hashable, list[int]] = {}
    for i in index:
        key = needs[i].source_key
        if key is None:
            units.append([i])
        elif key in by_key:
            by_key[key].append(i)
        else:
            by_key[key] = [i]
            units.append(by_key[key])
    return units


def _pieces(unit: list[int], with_source: bool, capacity: int) -> list[list[Branch]]:
    """A unit's branches, split into pieces of at most ``capacity`` branches, each with its source branch."""
    if not with_source:
        return [[Branch(i) for i in unit]]
    per_piece = max(capacity - 1, 1)
    pieces = []
    for k in range(0, len(unit), per_piece):
        part = unit[k:k + per_piece]
        pieces.append([Branch(part[0], is_source=True)] + [Branch(i, source=0) for i in part])
    return pieces


def _offset(piece: list[Branch], start: int) -> list[Branch]:
    """The piece's branches with their source index moved to where the piece starts in its call."""
    return [Branch(b.row, b.is_source, None if b.source is None else b.source + start) for b in piece]


def plan_sampling(needs: Sequence[RowNeeds], batch_size: int | None,
                  riders: Mapping[int, tuple[bool, list[int]]] | None = None) -> list[SamplingCall]:
    """The sampling calls of a group of rows that share (n, s, eta).

    Guided and unguided rows go to calls of their own (in order of first appearance); units are placed first-fit,
    so calls stay full and, with a batch size, a unit is split only when it is larger than a call. A unit needs at
    least two rows per call (its source and one edit): at batch size 1 its calls are padded to 2.

    ``riders``: inversions still to run, by leading row: (guided, the rows that wait on it). Each rides in a call of
    its kind as one more row, inverting in step with the sampling, so it fills rows that would be padding; a call
    holds a row only once the inversions it waits on have run in earlier calls (``_pack``).
    """
    calls: list[SamplingCall] = []
    kinds: dict[bool, list[int]] = {}
    for i, need in enumerate(needs):
        kinds.setdefault(need.guided, []).append(i)
    for guided in {**kinds, **{g: [] for g, _ in (riders or {}).values()}}:
        pieces: list[tuple[list[Branch], int | None]] = []
        for unit in _units(needs, kinds.get(guided, [])):
            with_source = needs[unit[0]].source_key is not None
            pad_to = batch_size if batch_size is None or not with_source else max(batch_size, 2)
            capacity = pad_to if pad_to is not None else len(unit) + 1
            pieces += [(piece, pad_to) for piece in _pieces(unit, with_source, capacity)]
        mine = {leader: waiting for leader, (g, waiting) in (riders or {}).items() if g == guided}
        calls += _pack(pieces, guided, mine, batch_size)
    return calls


def _pack(pieces: list[tuple[list[Branch], int | None]], guided: bool, riders: Mapping[int, list[int]],
          batch_size: int | None) -> list[SamplingCall]:
    """One kind's pieces into calls. Without riders: first-fit. With riders (all pieces padded to one size P): call
    by call, the ready pieces smaller than P (first-fit, largest first) and then riders fill it; riders whose waiting
    rows form small pieces go first, so those pieces become ready while riders are left to pair them with."""
    calls: list[tuple[int | None, list[Branch], list[int]]] = []
    waits = {row: leader for leader, rows in riders.items() for row in rows}
    queue = sorted(riders, key=lambda leader: sum(len(p) for p, _ in pieces if any(b.row in riders[leader]
                                                                                  for b in p)))
    done: set[int] = set()
    todo = list(pieces)
    while queue:
        pad_to = batch_size or len(queue)  # riders come only with a batch size of 2 or more
        ready = [p for p in todo if all(waits.get(b.row) in done or b.row not in waits for b in p[0])]
        home: list[Branch] = []
        for piece in sorted((p for p in ready if len(p[0]) < pad_to), key=lambda p: -len(p[0])):
            if len(home) + len(piece[0]) <= pad_to:
                home.extend(_offset(piece[0], len(home)))
                todo.remove(piece)
        if not home and len(queue) < pad_to and ready:
            piece = ready[0]  # too few riders left to fill a call: the last ones ride beside a whole unit's rest
            todo.remove(piece)
            calls.append((piece[1], _offset(piece[0], 0), []))
            continue
        ride, queue = queue[:pad_to - len(home)], queue[pad_to - len(home):]
        done.update(ride)
        calls.append((pad_to, home, ride))
    for piece, pad_to in todo:
        home = next((branches for p, branches, r in calls if p == pad_to and not r
                     and (pad_to is None or len(branches) + len(piece) <= pad_to)), None)
        if home is None:
            home = []
            calls.append((pad_to, home, []))
        home.extend(_offset(piece, len(home)))
    return [SamplingCall(tuple(branches), guided, pad_to, tuple(ride)) for pad_to, branches, ride in calls]


def chunks(index: list[int], batch_size: int | None) -> list[list[int]]:
    """``index`` in calls of at most ``batch_size`` rows (all of it in one call without a batch size)."""
    step = batch_size or max(len(index), 1)
    return [index[k:k + step] for k in range(0, len(index), step)]


@dataclass(frozen=True)
class InversionCall:
    """One inversion loop over a chunk of unique inversions: ``from_level`` - s UNet calls of the same rows."""

    rows: tuple[int, ...]  # the rows whose trajectories this call computes (each leads the rows that share it)
    from_level: int  # n: from x0; less: continuing a stored, shallower trajectory from its deepest level
    method: str  # the inversion method of the trajectory (``InversionMethod.trajectory``)
    guided: bool  # inversion guidance != 1
    pad_to: int | None = None  # rows per CFG half after padding (None: no padding)

    @property
    def shape(self) -> tuple[int | None, bool]:
        """What the denoiser runs (``model_adapter.Layout``): (rows per CFG half after padding, both halves)."""
        return self.pad_to, self.guided


def plan_inversions(leaders: Sequence[int], from_levels: Sequence[int], methods: Sequence[str],
                    guided: Sequence[bool], batch_size: int | None) -> list[InversionCall]:
    """Unique inversions grouped by (start level, method, guided) in order of first appearance, then chunked, so the
    partial call happens once per kind, not once per ``batch_size`` rows."""
    kinds: dict[tuple[int, str, bool], list[int]] = {}
    for i, level, method, g in zip(leaders, from_levels, methods, guided):
        kinds.setdefault((level, method, g), []).append(i)
    return [InversionCall(tuple(part), level, method, g, batch_size) for (level, method, g), rows in kinds.items()
            for part in chunks(rows, batch_size)]
