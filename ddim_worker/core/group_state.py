"""What the executor's steps share for one group: its rows, schedule and plan, and what has been worked out per
row so far (``RowWork``). A module of its own so that the steps (``inversion_steps``, ``mask_step``,
``sampling_steps``) and the executor (``group_run``) all import it, and none of them imports another upward."""

from __future__ import annotations

from dataclasses import dataclass, field

from ddim_worker.core.edit_types import EditRow, RowWork
from ddim_worker.core.group_plan import GroupPlan
from ddim_worker.core.model_adapter import ModelAdapter
from ddim_worker.core.sampler import Schedule


@dataclass
class GroupRun:
    """One group's rows and what the steps have worked out for them."""

    model: ModelAdapter
    rows: list[EditRow]
    schedule: Schedule
    start_step: int
    eta: float
    plan: GroupPlan
    work: list[RowWork] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.work:
            self.work = [RowWork() for _ in self.rows]

    @property
    def batch_size(self) -> int | None:
        return self.model.batch_size

    @property
    def sampled_steps(self) -> int:
        return self.schedule.num_steps - self.start_step
