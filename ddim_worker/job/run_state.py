"""The state of one run, as its steps fill it in: the run's identity and lease, what it learnt of the manifest and
the cluster, the ledger as last scanned, what streamed back, and what the finish wrote. The driver's steps read and
write this one object; the summary (``job.json``) is built from it in one place (``summary.build_summary``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddim_worker.job import ledger
from ddim_worker.job.cluster import EnginePlan
from ddim_worker.job.config import JobConfig
from ddim_worker.job.lease import Lease
from ddim_worker.job.pack import PackResult
from ddim_worker.job.source import SourceContext
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import EDITED, FAILED
from ddim_worker.job.stages import StageContext

log = logging.getLogger("ddim_edit.job")


class JobError(RuntimeError):
    """The job as a whole cannot run (bad manifest, model or output): one clear message, no traceback per row."""


class LeaseLost(JobError):
    """Another run took the output: this run writes nothing more, its records included."""


class Progress:
    """Rows done / failed / total, rows/s and ETA, logged at most every few seconds; counts from what is done."""

    def __init__(self, total: int, already: int, every_s: float = 5.0):
        self.total, self.done, self.failed, self.every_s = total, already, 0, every_s
        self.started = self.last = time.monotonic()
        self.computed = 0

    def update(self, statuses: list[str], force: bool = False) -> None:  # noqa: D102
        self.done = min(self.done + len(statuses), self.total)
        self.computed += len(statuses)
        self.failed += sum(s == FAILED for s in statuses)
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = self.computed / max(now - self.started, 1e-9)
            left = self.total - self.done
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            log.info("rows %d/%d done (%d failed this run), %.2f rows/s, ETA %s", self.done, self.total,
                     self.failed, rate, eta)


@dataclass
class Tally:
    """What the driver keeps while rows stream past: work counters, and a byte per manifest row (computed)."""

    total: int
    computed: np.ndarray = field(init=False)  # rows this run edited (or failed), counted once across attempts
    rows_seen: int = 0  # results that came back this attempt (progress of an attempt that then aborted)
    failed_seen: int = 0
    inversions: int = 0
    cache_hits: int = 0
    unet_passes: int = 0
    unet_samples: float = 0.0
    ideal_unet_samples: int = 0
    recovered: int = 0
    dtypes: set = field(default_factory=set)
    written: dict = field(default_factory=lambda: dict.fromkeys(("images", "inputs", "latents", "results"), 0))

    def __post_init__(self) -> None:
        self.computed = np.zeros(self.total, bool)

    def bytes_written(self, dataset: int, computed: int) -> dict[str, Any]:
        """Bytes this run wrote, by kind (images: edited PNGs saved or embedded; inputs: inputs and
        reconstructions), and per computed row."""
        kinds = {**self.written, "dataset": dataset}
        return {**kinds, "total": sum(kinds.values()),
                "per_row": {k: round(v / computed) for k, v in kinds.items()} if computed else None}

    def add(self, summary: dict[str, np.ndarray]) -> list[str]:
        rows = summary["manifest_row"].astype(np.int64)
        statuses = [str(s) for s in summary["status"]]
        recovered = summary["recovered"].astype(bool)
        ran = np.array([s in (*EDITED, FAILED) for s in statuses], bool) & ~recovered
        self.computed[rows[ran]] = True
        self.rows_seen += len(statuses)
        self.failed_seen += sum(s == FAILED for s in statuses)
        passes = summary["inversion_passes"].astype(np.int64)
        self.inversions += int((passes > 0).sum())
        self.cache_hits += int(summary["cache_hit"].astype(bool).sum())
        self.unet_passes += int(summary["unet_passes"].astype(np.int64).sum())
        self.unet_samples += float(summary["unet_samples"].astype(np.float64).sum())
        self.ideal_unet_samples += int(summary["ideal_unet_samples"].astype(np.int64).sum())
        self.recovered += int(recovered.sum())
        for kind, column in (("images", "image_bytes"), ("inputs", "input_bytes"), ("latents", "latent_bytes"),
                             ("results", "results_bytes")):
            if column in summary:
                values = summary[column].astype(np.float64)
                self.written[kind] += int(values[~recovered].sum()) if kind == "images" else int(values.sum())
        self.dtypes.update(str(d) for d, s in zip(summary["dtype"], statuses) if s in EDITED and d)
        return statuses


@dataclass
class Manifest:
    """The manifest as the driver holds it: its rows' ledger keys (8 bytes a row), and what reading tasks need."""

    source_ctx: SourceContext
    keys: np.ndarray  # uint64 per manifest row: the key its result is filed under (see ``manifest.ledger_key``)

    @property
    def total(self) -> int:
        return len(self.keys)

    def unique_keys(self) -> np.ndarray:
        return np.unique(self.keys)


@dataclass
class Run:
    """One run of the job, filled in step by step (see ``driver``)."""

    config: JobConfig
    layout: OutputLayout
    lease: Lease
    started: float = field(default_factory=time.monotonic)
    number: int = 0  # the run's number on this output (never repeats: ``driver.take_run_number``)
    generation: str = ""
    attempts: int = 0
    stopped_early: str | None = None
    error: str | None = None  # the job could not go on (it still records what it did)
    recorded: bool = False  # job.json holds this run's final record
    # 1-3: what the run found
    model: str = ""  # as the actors load it
    hub_commit: str | None = None
    fingerprint: str = ""
    scorer: str | None = None  # as the actors load it (--scorer)
    scorer_fingerprint: str | None = None
    source: Any = None  # the manifest's plan (``source.ManifestSource``)
    plan: EnginePlan | None = None
    manifest: Manifest | None = None
    ctx: StageContext | None = None
    # 4-5: the ledger and what streamed back
    index: ledger.LedgerIndex | None = None  # the ledger as last scanned
    scans: int = 0
    done_before: int = 0
    tally: Tally | None = None
    progress: Progress | None = None
    # 6-9: what the finish wrote
    counts: dict[str, int] = field(default_factory=dict)
    stale: int = 0  # rows of ids the manifest does not have
    pruned: int = 0
    failed_uri: str | None = None
    report: dict[str, Any] = field(default_factory=lambda: {"pages": [None], "contact_sheet": None})
    dataset: PackResult | None = None
    not_packed: str | None = None

    def check_lease(self) -> None:
        """Called before every write that changes what other runs see (compaction, pruning, packing, records):
        a run that lost its lease (taken by another run, or not renewed for ``lease.FENCE_S``) writes nothing more.
        Its tasks stop too: each checks the lease before it writes a results shard."""
        reason = self.lease.lost_reason()
        if reason is not None:
            raise LeaseLost(f"this run stopped writing to {self.config.output}: {reason}")

    def scan(self) -> ledger.LedgerIndex:
        """Read the ledger (its key columns) again: at the start, after a compaction, and at the finish."""
        self.index = ledger.scan(self.layout, self.config.storage_options)
        self.scans += 1
        return self.index
