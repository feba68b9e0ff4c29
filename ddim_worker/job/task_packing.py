"""Rows into engine tasks whose model calls fill, so reproducible bytes cost little padding.

Every engine call is padded to the batch size (a row's bytes must not depend on its neighbours), and an actor task
edits ``calls_per_task`` calls' worth of rows. Cut at a fixed number of rows, a task would split an image's rows
(each side then samples its own source branch) and end on a partial call. Here the read stage cuts its sorted rows
into tasks of exactly ``task_rows`` rows, holding whole images (rows that share an inversion) as long as their
sampling calls fit in ``calls_per_task`` calls, and fills the rest with *filler* rows: they hold a task's place
through the stream and the engine actor drops them. Blocks of ``task_rows`` rows then are the engine's tasks.

The calls are counted by the engine's own planner (``call_plan.plan_sampling`` over ``edit_types.call_needs``),
so the packing follows the engine's rules: guided and unguided rows in calls of their own, one source branch per
image with attention control or direct inversion, rows of other (steps, start, eta) groups apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from ddim_worker.core.call_plan import RowNeeds, plan_sampling
from ddim_worker.core.edit_types import EditRow, call_needs
from ddim_worker.core.inversion_key import InversionKey
from ddim_worker.core.settings import SETTING_NAMES
from ddim_worker.rows import PENDING

#: The status of a row that only holds a task's place: the engine actor drops it, nothing records it.
FILLER = "filler"

#: Images looked at past the next one for one that fills a task's last free rows (rows of one image stay together).
LOOKAHEAD_UNITS = 16

#: Images a task may give back to the next one when that leaves its calls less padded.
TRIM_UNITS = 4

Needs = tuple[tuple[tuple[Hashable, RowNeeds], ...], ...]  # per row of a unit: (group, needs) per edit branch


def _flat(needs: Needs) -> tuple[tuple[Hashable, RowNeeds], ...]:
    return tuple(need for row in needs for need in row)


def pending_needs(record: Mapping[str, Any], key: InversionKey) -> tuple[tuple[Hashable, RowNeeds], ...]:
    """(its engine group, what the call planner reads of it) for each edit branch of a row to edit (one per
    candidate: they share the row's source branch), before its image is read."""
    row = _row(record)
    return ((row.group, call_needs(row, key)),) * max(int(row.candidates), 1)


def inversion_kind(record: Mapping[str, Any]) -> Hashable:
    """Inversions of one kind share calls: (engine group, guided while inverting)."""
    row = _row(record)
    return row.group, float(row.inversion_guidance) != 1.0


def _row(record: Mapping[str, Any]) -> EditRow:
    return EditRow(None, str(record["source_prompt"]), str(record["edit_prompt"]),  # type: ignore[arg-type]
                   **{name: record[name] for name in SETTING_NAMES})


def calls_of(needs: Sequence[tuple[Hashable, RowNeeds]], batch_size: int) -> int:
    """The sampling calls the engine plans for these rows (each group and kind apart)."""
    return sum(_calls(members, batch_size) for members in _by_group(needs))


def _by_group(needs: Sequence[tuple[Hashable, RowNeeds]]) -> list[list[RowNeeds]]:
    """The rows' needs per engine group (rows of other groups never share a call)."""
    groups: dict[Hashable, list[RowNeeds]] = {}
    for group, need in needs:
        groups.setdefault(group, []).append(need)
    return list(groups.values())


def padding_of(needs: Sequence[tuple[Hashable, RowNeeds]], inversions: Sequence[Hashable], batch_size: int) -> int:
    """UNet rows a step that padding costs: the planner's sampling calls for ``needs`` and one inversion call per
    ``batch_size`` inversions of a kind (``inversions``: one kind per unique inversion; riding is not counted)."""
    pad = 0
    for members in _by_group(needs):
        if all(need.source_key is None for need in members):
            guided = sum(need.guided for need in members)
            pad += 2 * _gap(guided, batch_size) + _gap(len(members) - guided, batch_size)
        else:
            pad += sum((call.size - len(call.branches)) * (2 if call.guided else 1)
                       for call in plan_sampling(members, batch_size))
    for (_, guided), n in Counter(inversions).items():
        pad += _gap(n, batch_size) * (2 if guided else 1)
    return pad


def _gap(n: int, batch_size: int) -> int:
    return -(-n // batch_size) * batch_size - n


def _calls(members: list[RowNeeds], batch_size: int) -> int:
    if all(need.source_key is None for need in members):  # rows alone fill calls in order: the planner's count
        guided = sum(need.guided for need in members)
        return -(-guided // batch_size) + -(-(len(members) - guided) // batch_size)
    return len(plan_sampling(members, batch_size))


def pack_tasks(records: list[dict[str, Any]], keys: Sequence[InversionKey | None], task_rows: int, batch_size: int,
               calls_per_task: int, filler: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` (sorted so that rows sharing an inversion are neighbours) in tasks of exactly ``task_rows`` rows.

    ``keys``: each row's inversion key (None: a row not to edit, which costs no call). A task takes whole images
    while their calls fit in ``calls_per_task``; an image whose rows fit a task is never cut (alone in a task, it may
    take more calls); one with more rows than a task is cut into task-sized pieces.
    The rows of every task are followed by ``filler()`` rows up to ``task_rows``.
    """
    units = _units(records, keys)
    out: list[dict[str, Any]] = []
    while units:
        task: list[tuple[list[dict[str, Any]], Needs]] = []
        rows, needs = 0, ()
        i = 0
        while i < len(units) and i <= LOOKAHEAD_UNITS and rows < task_rows:
            members, unit_needs = units[i]
            fits = rows + len(members) <= task_rows and (
                not task or not unit_needs or calls_of(_flat(needs + unit_needs), batch_size) <= calls_per_task)
            if fits:  # (the first image of a task always fits while its rows do: one inversion for it is worth
                task.append(units.pop(i))  # more than a call over the task's count)
                rows, needs = rows + len(members), needs + unit_needs
            elif not task:  # one image with more rows than a task: its first task-sized piece
                piece = _piece(members, unit_needs, task_rows, batch_size, calls_per_task)
                units[i] = (members[piece:], unit_needs[piece:])
                task.append((members[:piece], unit_needs[:piece]))
                break
            else:
                i += 1
        keep = _least_padding(task, batch_size)
        units[:0], task = task[keep:], task[:keep]  # images left out start the next task
        for members, _ in task:
            out += members
        out += [filler() for _ in range(task_rows - sum(len(m) for m, _ in task))]
    return out


def _units(records: list[dict[str, Any]], keys: Sequence[InversionKey | None]) -> list[tuple[list[dict], Needs]]:
    """Consecutive rows sharing an inversion key as one unit; a row not to edit is a unit of its own, needing no call."""
    units: list[tuple[list[dict], Needs]] = []
    last: InversionKey | None = None
    for record, key in zip(records, keys):
        if key is None or (record.get("status") or PENDING) != PENDING:
            units.append(([record], ()))
            last = None
            continue
        need = pending_needs(record, key)
        if key == last:
            members, needs = units[-1]
            units[-1] = (members + [record], needs + (need,))
        else:
            units.append(([record], (need,)))
        last = key
    return units


def _least_padding(task: list[tuple[list[dict], Needs]], batch_size: int) -> int:
    """How many of the task's first images to keep: the cut (of the last ``TRIM_UNITS``) whose calls pad least per
    edited row, the longest of equals (5 plain images of 3 edits at batch 4 pad an inversion call; 4 pad none)."""
    best, keep = None, len(task)
    for k in range(len(task), max(len(task) - TRIM_UNITS, 1) - 1, -1):
        needs = [n for _, unit_needs in task[:k] for n in _flat(unit_needs)]
        kinds = [inversion_kind(members[0]) for members, unit_needs in task[:k] if unit_needs]
        if not needs and k < len(task):  # rows not to edit ride along with the task's images, never alone
            continue
        cost = padding_of(needs, kinds, batch_size) / max(len(needs), 1)
        if best is None or cost < best - 1e-9:
            best, keep = cost, k
    return keep


def _piece(members: list[dict], needs: Needs, task_rows: int, batch_size: int, calls_per_task: int) -> int:
    """How many of an oversized unit's first rows fill one task (at least one)."""
    n = 1
    while (n < len(members) and n + 1 <= task_rows
           and calls_of(_flat(needs[:n + 1]), batch_size) <= calls_per_task):
        n += 1
    return n


def drop_fillers(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its filler rows (the engine actor's first step: fillers end there)."""
    status = batch["status"]
    keep = [i for i in range(len(status)) if status[i] != FILLER]
    if len(keep) == len(status):
        return batch
    return {name: values[keep] for name, values in batch.items()}
