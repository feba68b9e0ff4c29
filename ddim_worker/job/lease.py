"""One run per output at a time: ``OUTPUT/lease.json`` names the run that holds the output and carries its heartbeat.

Two drivers writing one output would each record the other's rows and delete each other's work in flight, so a run
takes the lease before Ray starts and gives it back when it ends. A second run finds a live lease and stops at once
(exit 2, naming the holder). A lease is stale, and taken over with a warning, when its heartbeat is older than
``EXPIRES_S`` or its driver's process is gone from this host; ``--break-lease`` takes any lease (for a holder known
to be dead on another host, without waiting for it to expire).

Taking a lease: read it (refuse a live one), write ours, wait ``SETTLE_S`` and read it back: of two runs that took it
at the same moment, the one whose write landed last holds it, and the other sees that and stops. The holder's
heartbeat also reads the lease before renewing it: a run whose lease was broken learns it and stops its job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from ddim_worker import storage

log = logging.getLogger("ddim_edit.job")

#: Seconds between heartbeats of a running job.
HEARTBEAT_S = 10.0
#: A lease whose heartbeat is older than this belongs to a dead run (6 missed heartbeats).
EXPIRES_S = 60.0
#: Seconds between writing a lease and reading it back (object stores make a PUT visible at once).
SETTLE_S = 0.5


class LeaseHeld(RuntimeError):
    """Another live run holds the output."""


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started: float  # epoch seconds
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

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease no longer holds (None while its run is alive)."""
        age = (time.time() if now is None else now) - self.heartbeat
        if age > EXPIRES_S:
            return f"its last heartbeat was {age:.0f} s ago"
        if self.host == socket.gethostname() and not _process_alive(self.pid):
            return f"its driver (pid {self.pid}) is no longer running on this host"
        return None

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started {started}, last heartbeat "
                f"{age:.0f} s ago)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lease(uri: str, storage_options: dict | None) -> LeaseRecord | None:
    try:
        data = storage.read_bytes(uri, storage_options)
    except (FileNotFoundError, OSError):
        return None
    return LeaseRecord.from_bytes(data) or LeaseRecord("unreadable", "?", -1, 0.0, 0.0)


def check_free(uri: str, storage_options: dict | None, break_lease: bool = False) -> LeaseRecord | None:
    """Raise ``LeaseHeld`` when a live run holds ``uri``; returns the stale lease found, if any. Writes nothing."""
    held = read_lease(uri, storage_options)
    if held is None or break_lease:
        return held
    if held.stale_reason() is None:
        raise LeaseHeld(
            f"{uri} is held by {held.describe()}: another run is writing this output. Wait for it to finish; if "
            f"it is dead, its lease expires {EXPIRES_S:.0f} s after its last heartbeat, or rerun with --break-lease")
    return held


class Lease:
    """The lease this run holds: renewed by a heartbeat thread, given back by ``release``."""

    def __init__(self, uri: str, storage_options: dict | None, record: LeaseRecord):
        self.uri, self.storage_options, self.record = uri, storage_options, record
        self.lost: LeaseRecord | None = None  # set when another run took the lease from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, uri: str, storage_options: dict | None, manifest: str, break_lease: bool = False) -> Lease:
        """Take the lease (see the module's docstring); raises ``LeaseHeld`` when another live run has it."""
        found = check_free(uri, storage_options, break_lease)
        if found is not None:
            reason = "--break-lease" if break_lease else found.stale_reason()
            log.warning("taking over the lease of %s on %s: %s", found.run_id, uri, reason)
        record = LeaseRecord.new(manifest)
        storage.write_bytes(uri, record.to_bytes(), storage_options)
        time.sleep(SETTLE_S)
        now = read_lease(uri, storage_options)
        if now is None or now.run_id != record.run_id:
            other = now.describe() if now is not None else "a run that has already released it"
            raise LeaseHeld(f"{uri} was taken at the same moment by {other}; this run stops")
        lease = cls(uri, storage_options, record)
        lease._thread = threading.Thread(target=lease._beat, name="ddim-edit-lease", daemon=True)
        lease._thread.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                now = read_lease(self.uri, self.storage_options)
                if now is not None and now.run_id != self.record.run_id:
                    self.lost = now
                    log.error("the lease on %s was taken by %s; this run stops", self.uri, now.describe())
                    return
                self.record = LeaseRecord(**{**asdict(self.record), "heartbeat": time.time()})
                storage.write_bytes(self.uri, self.record.to_bytes(), self.storage_options)
            except OSError as exc:  # a storage hiccup: the lease holds until EXPIRES_S, try again next beat
                log.warning("could not renew the lease on %s: %s", self.uri, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            now = read_lease(self.uri, self.storage_options)
            if now is not None and now.run_id == self.record.run_id:
                storage.remove(self.uri, self.storage_options)
        except OSError as exc:
            log.warning("could not release the lease on %s: %s", self.uri, exc)
