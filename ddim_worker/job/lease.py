"""One run per output at a time: ``OUTPUT/lease.json`` names the run that holds the output; its renewals are its
heartbeat.

Two drivers writing one output would each record the other's rows and delete each other's work in flight, so a run
takes the lease before Ray starts and gives it back when it ends. A second run finds a live lease and stops at once
(exit 2, naming the holder).

Every step is a conditional write, so two runs can never both believe they hold it:

- taking a free lease is an exclusive create (S3 ``If-None-Match: *``, local ``O_EXCL``);
- renewing it, taking over a stale one and giving it back are writes conditional on the version last seen (S3
  ``If-Match`` on the ETag; locally a digest compared under ``flock``): a run whose lease was taken learns it on its
  next renewal, because that renewal is refused;
- a lease is stale when the store itself says it was last written more than ``EXPIRES_S`` ago: its last-modified
  time against the last-modified time of a probe object written now. No host's clock is compared with another's,
  so a driver whose clock runs ahead (or behind) can neither take a live lease nor keep a dead one alive. A lease
  whose driver is gone from this host (same host name, no such process) is stale at once; ``--break-lease`` takes
  any lease.

A holder that cannot renew (the store is down, credentials expired: every exception is caught and counted) fences
itself: once ``FENCE_S`` (half of ``EXPIRES_S``) has passed since its last successful renewal was sent, it counts
the lease as lost and stops writing, well before any other run could see the lease as stale. The watch thread tells
the driver at once (``on_lost``), even while a renewal hangs.

``DDIM_EDIT_LEASE_EXPIRES_S`` sets ``EXPIRES_S`` (default 60 s); the heartbeat is a sixth of it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ddim_worker import storage

log = logging.getLogger("ddim_edit.job")

#: A lease whose last renewal the store dates older than this belongs to a dead run.
EXPIRES_S = float(os.environ.get("DDIM_EDIT_LEASE_EXPIRES_S", "60"))
#: Seconds between renewals of a running job (six renewals fit in ``EXPIRES_S``).
HEARTBEAT_S = EXPIRES_S / 6
#: A holder that has not renewed for this long stops writing: it may be about to lose the lease.
FENCE_S = EXPIRES_S / 2


class LeaseHeld(RuntimeError):
    """Another live run holds the output."""


@dataclass(frozen=True)
class LeaseRecord:
    """What ``lease.json`` says: who holds it. ``heartbeat`` is the holder's clock, for people; staleness is judged
    by the store's timestamps, never by it."""

    run_id: str
    host: str
    pid: int
    started: float  # epoch seconds, by the holder's clock
    heartbeat: float  # epoch seconds, by the holder's clock
    manifest: str = ""

    @classmethod
    def new(cls, manifest: str) -> LeaseRecord:
        now = time.time()
        return cls(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", socket.gethostname(),
                   os.getpid(), now, now, manifest)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        try:
            values = json.loads(data)
            return cls(**{k: values[k] for k in ("run_id", "host", "pid", "started", "heartbeat")},
                       manifest=values.get("manifest", ""))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: a lease nobody can hold

    def renewed(self) -> LeaseRecord:
        return LeaseRecord(**{**asdict(self), "heartbeat": time.time()})


@dataclass(frozen=True)
class FoundLease:
    """A lease as another run finds it: its record, its version and its age by the store's clock."""

    record: LeaseRecord
    version: str
    age_s: float

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def stale_reason(self) -> str | None:
        """Why this lease no longer holds (None while its run is alive)."""
        if self.age_s > EXPIRES_S:
            return f"the store dates its last renewal {self.age_s:.0f} s ago"
        if self.record.host == socket.gethostname() and not _process_alive(self.record.pid):
            return f"its driver (pid {self.record.pid}) is no longer running on this host"
        return None

    def describe(self) -> str:
        r = self.record
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.started))
        return f"run {r.run_id} (host {r.host}, pid {r.pid}, started {started}, last renewed {self.age_s:.0f} s ago)"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _folder(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if "://" in uri else os.path.dirname(uri)


def find_lease(uri: str, storage_options: dict | None) -> FoundLease | None:
    """The lease at ``uri`` with its age by the store's clock; None when there is none."""
    try:
        version, modified = storage.version_of(uri, storage_options)
        data = storage.read_bytes(uri, storage_options)
    except FileNotFoundError:
        return None
    record = LeaseRecord.from_bytes(data) or LeaseRecord("unreadable", "?", -1, 0.0, 0.0)
    age = storage.store_now(_folder(uri), storage_options) - modified
    return FoundLease(record, version, max(age, 0.0))


def holder(uri: str, storage_options: dict | None) -> str | None:
    """The run id named by the lease at ``uri`` (one read: what a task checks before it writes results)."""
    try:
        record = LeaseRecord.from_bytes(storage.read_bytes(uri, storage_options))
    except FileNotFoundError:
        return None
    return record.run_id if record else None


def check_free(uri: str, storage_options: dict | None, break_lease: bool = False) -> FoundLease | None:
    """Raise ``LeaseHeld`` when a live run holds ``uri``; returns the stale lease found, if any. Writes nothing but a
    probe (to read the store's clock)."""
    found = find_lease(uri, storage_options)
    if found is None or break_lease:
        return found
    if found.stale_reason() is None:
        raise LeaseHeld(
            f"{uri} is held by {found.describe()}: another run is writing this output. Wait for it to finish; if "
            f"it is dead, its lease expires {EXPIRES_S:.0f} s after its last renewal, or rerun with --break-lease")
    return found


class Lease:
    """The lease this run holds: renewed by a heartbeat thread, watched for loss, given back by ``release``."""

    def __init__(self, uri: str, storage_options: dict | None, record: LeaseRecord, version: str,
                 on_lost: Callable[[str], None] | None = None):
        self.uri, self.storage_options, self.record, self.version = uri, storage_options, record, version
        self.on_lost = on_lost
        self.failures = 0  # renewals that raised (the store unreachable, say)
        self.renewed_at = time.monotonic()  # when the last successful renewal was sent
        self._taken: str | None = None  # set when a renewal was refused: another run holds the lease now
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def acquire(cls, uri: str, storage_options: dict | None, manifest: str, break_lease: bool = False,
                on_lost: Callable[[str], None] | None = None) -> Lease:
        """Take the lease (see the module's docstring); raises ``LeaseHeld`` when another live run has it."""
        record = LeaseRecord.new(manifest)
        for _ in range(3):
            sent = time.monotonic()
            try:
                version = storage.create_exclusive(uri, record.to_bytes(), storage_options)
            except storage.PreconditionFailed:
                found = check_free(uri, storage_options, break_lease)
                if found is None:
                    continue  # given back meanwhile: try to create it again
                reason = "--break-lease" if break_lease else found.stale_reason()
                log.warning("taking over the lease of %s on %s: %s", found.run_id, uri, reason)
                try:
                    version = storage.replace_if(uri, record.to_bytes(), found.version, storage_options)
                except storage.PreconditionFailed:
                    now = find_lease(uri, storage_options)
                    other = now.describe() if now is not None else "a run that has already released it"
                    raise LeaseHeld(f"{uri} was taken at the same moment by {other}; this run stops") from None
            lease = cls(uri, storage_options, record, version, on_lost)
            lease.renewed_at = sent
            lease._start()
            return lease
        raise LeaseHeld(f"{uri} keeps changing under this run (other runs are starting on the same output)")

    def _start(self) -> None:
        for name, target in (("ddim-edit-lease", self._beat), ("ddim-edit-lease-watch", self._watch)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def lost_reason(self) -> str | None:
        """Why this run no longer holds the lease (None while it does)."""
        if self._taken is not None:
            return self._taken
        silent = time.monotonic() - self.renewed_at
        if silent > FENCE_S:
            return (f"it could not renew its lease on {self.uri} for {silent:.0f} s ({self.failures} failed "
                    f"renewals): another run may take the output {EXPIRES_S:.0f} s after the last renewal")
        return None

    @property
    def lost(self) -> bool:
        return self.lost_reason() is not None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.lost:
                return
            sent = time.monotonic()
            record = self.record.renewed()
            try:
                self.version = storage.replace_if(self.uri, record.to_bytes(), self.version, self.storage_options)
                self.record, self.renewed_at = record, sent
            except storage.PreconditionFailed:
                now = find_lease_quietly(self.uri, self.storage_options)
                self._taken = (f"its lease on {self.uri} was taken by "
                               f"{now.describe() if now else 'another run (since given back)'}")
                log.error("%s; this run stops", self._taken)
                return
            except Exception as exc:  # noqa: BLE001 - any failure to renew: counted, fenced by FENCE_S
                self.failures += 1
                log.warning("could not renew the lease on %s (%d failed): %s: %s", self.uri, self.failures,
                            type(exc).__name__, exc)

    def _watch(self) -> None:
        """Tell the driver the moment the lease is lost, even while a renewal hangs on a dead store."""
        while not self._stop.wait(min(1.0, HEARTBEAT_S)):
            reason = self.lost_reason()
            if reason is not None:
                log.error("this run lost the output: %s", reason)
                if self.on_lost is not None:
                    self.on_lost(reason)
                return

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (a conditional delete)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._taken is not None:
            return
        try:
            storage.remove_if(self.uri, self.version, self.storage_options)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the lease on %s: %s", self.uri, exc)


def find_lease_quietly(uri: str, storage_options: dict | None) -> FoundLease | None:
    try:
        return find_lease(uri, storage_options)
    except Exception:  # noqa: BLE001 - only for a message
        return None
