"""The lease and the conditional writes under it, on a local folder and on a real S3 server (SeaweedFS on loopback):
one holder at a time, staleness by the store's clock, a holder that cannot renew fences itself, uploads that fail
publish nothing."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from ddim_worker import storage
from ddim_worker.job import lease as lease_module
from ddim_worker.job.lease import Lease, LeaseHeld, check_free, holder
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def fast_lease(monkeypatch):
    """A lease that expires in 3 s (renewed every 0.5 s, fenced after 1.5 s without a renewal)."""
    monkeypatch.setattr(lease_module, "EXPIRES_S", 3.0)
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(lease_module, "FENCE_S", 1.5)


@pytest.fixture
def roomy_lease(monkeypatch):
    """A lease that expires in 8 s (renewed every 0.5 s, fenced after 4 s without a renewal): for a test that needs
    its renewals to keep succeeding for a while on a loaded machine, where one PUT can take over 1.5 s."""
    monkeypatch.setattr(lease_module, "EXPIRES_S", 8.0)
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(lease_module, "FENCE_S", 4.0)


def test_conditional_writes(store):
    base, options = store
    uri = storage.join_uri(base, "obj.json")
    first = storage.create_exclusive(uri, b"one", options)
    with pytest.raises(storage.PreconditionFailed):
        storage.create_exclusive(uri, b"two", options)
    assert storage.read_bytes(uri, options) == b"one"
    second = storage.replace_if(uri, b"three", first, options)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if(uri, b"four", first, options)  # a writer that missed the change is refused
    assert storage.read_bytes(uri, options) == b"three"
    assert not storage.remove_if(uri, first, options) and storage.exists(uri, options)
    assert storage.remove_if(uri, second, options) and not storage.exists(uri, options)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if(uri, b"five", second, options)  # gone: nothing to replace


@pytest.mark.parametrize("size", [1000, 12 * 2**20])  # one PUT, and a multipart upload
def test_a_failed_upload_publishes_nothing(store, size):
    base, options = store
    uri = storage.join_uri(base, "big.parquet")
    with pytest.raises(RuntimeError, match="half way"):
        with storage.open_write(uri, options) as handle:
            handle.write(b"x" * size)
            raise RuntimeError("half way")
    assert not storage.exists(uri, options)
    assert storage.list_names(base, options) == []


def test_one_holder_when_two_runs_start_at_once(store):
    base, options = store
    uri = storage.join_uri(base, "lease.json")
    held, refused = [], []
    start = threading.Barrier(4)

    def take() -> None:
        start.wait()
        try:
            held.append(Lease.acquire(uri, options, "m.parquet"))
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(held) == 1 and len(refused) == 3
        assert holder(uri, options) == held[0].record.run_id
    finally:
        for lease in held:
            lease.release()
    assert not storage.exists(uri, options)


def test_a_lease_taken_over_is_known_lost_and_never_deleted_by_its_old_holder(store, fast_lease):
    base, options = store
    uri = storage.join_uri(base, "lease.json")
    told = []
    first = Lease.acquire(uri, options, "m.parquet", on_lost=told.append)
    second = Lease.acquire(uri, options, "m.parquet", break_lease=True)
    try:
        deadline = time.monotonic() + 10
        while first.lost_reason() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "was taken by run " + second.record.run_id in first.lost_reason()
        time.sleep(1.2)  # the watch thread's tick
        assert told and told[0] == first.lost_reason()
        first.release()
        assert holder(uri, options) == second.record.run_id  # the old holder's release left it alone
        time.sleep(1.0)
        assert second.lost_reason() is None  # the new holder renews on
    finally:
        second.release()
    assert not storage.exists(uri, options)


def test_staleness_is_the_stores_clock(store, fast_lease):
    base, options = store
    uri = storage.join_uri(base, "lease.json")
    dead = Lease.acquire(uri, options, "m.parquet")
    dead._stop.set()  # its driver dies: no more renewals (its process is still this one: judged by age alone)
    try:
        with pytest.raises(LeaseHeld, match="held by run"):
            check_free(uri, options)
        time.sleep(lease_module.EXPIRES_S + 1.5)  # store timestamps have one second's resolution
        found = check_free(uri, options)
        assert found is not None and found.run_id == dead.record.run_id and "ago" in found.stale_reason()
        taker = Lease.acquire(uri, options, "m.parquet")
        assert holder(uri, options) == taker.record.run_id
        taker.release()
    finally:
        dead._stop.set()


def test_a_holder_cut_off_from_its_store_fences_itself_before_another_run_can_take_over(s3_server, s3_bucket,
                                                                                           roomy_lease):
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    cut_off = {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint_url,
                                                              "region_name": s3_server.region},
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
    uri = f"{s3_bucket}/{uuid.uuid4().hex}/lease.json"
    told: list[tuple[float, str]] = []
    first = Lease.acquire(uri, cut_off, "m.parquet", on_lost=lambda r: told.append((time.monotonic(), r)))
    try:
        time.sleep(1.0)
        assert first.lost_reason() is None
        proxy.cut()
        cut_at = time.monotonic()
        # the other run, on the store directly: refused while the lease is live
        with pytest.raises(LeaseHeld):
            check_free(uri, s3_server.storage_options)
        deadline = cut_at + 15
        while not told and time.monotonic() < deadline:
            time.sleep(0.1)
        assert told and "could not renew" in told[0][1]
        fenced_after = told[0][0] - cut_at
        assert fenced_after < lease_module.EXPIRES_S  # it stopped before anyone could take the lease
        while time.monotonic() - cut_at < lease_module.EXPIRES_S + 2:
            time.sleep(0.2)
        second = Lease.acquire(uri, s3_server.storage_options, "m.parquet")
        proxy.restore()
        time.sleep(1.0)
        assert first.lost_reason() is not None  # still lost: it never renews again
        first.release()
        assert holder(uri, s3_server.storage_options) == second.record.run_id
        second.release()
    finally:
        proxy.close()
