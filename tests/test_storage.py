"""ddim_worker.storage against a local folder and a real S3 server (SeaweedFS on loopback), plus fixture sanity."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest


from ddim_worker import storage
from ddim_worker.storage import StorageError
from tests.support.s3_server import STORE_BUCKET

BUCKET = STORE_BUCKET


def _keys(s3_server, prefix: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


# --------------------------------------------------------------------------------------------------------------------
# join_uri / filesystem


def test_join_uri_local_and_s3():
    assert storage.join_uri("s3://bucket/prefix", "images", "a.png") == "s3://bucket/prefix/images/a.png"
    assert storage.join_uri("s3://bucket/prefix/", "/images/", "a.png") == "s3://bucket/prefix/images/a.png"
    assert storage.join_uri("s3://bucket", "a.png") == "s3://bucket/a.png"
    assert storage.join_uri("s3://bucket/p") == "s3://bucket/p"
    assert storage.join_uri("/data/out", "images", "a.png") == "/data/out/images/a.png"
    assert storage.join_uri("/data/out/", "/images", "a.png") == "/data/out/images/a.png"
    assert storage.join_uri("out", "x") == os.path.join("out", "x")
    assert storage.join_uri("file:///data/out", "x.png") == "file:///data/out/x.png"
    assert storage.join_uri("memory://", "x.png") == "memory://x.png"


def test_filesystem_strips_protocol(s3_server):
    from fsspec.implementations.local import LocalFileSystem

    fs, path = storage.filesystem("/tmp/some/where")
    assert isinstance(fs, LocalFileSystem) and path == "/tmp/some/where"
    fs, path = storage.filesystem("s3://bucket/key/x.png", s3_server.storage_options)
    assert "s3" in fs.protocol and path == "bucket/key/x.png"


# --------------------------------------------------------------------------------------------------------------------
# Round trips, local and S3


def test_round_trip(store):
    base, so = store
    uri = storage.join_uri(base, "images", "a.png")
    assert not storage.exists(uri, so)
    storage.write_bytes(uri, b"\x89PNG first", so)
    assert storage.exists(uri, so)
    assert storage.read_bytes(uri, so) == b"\x89PNG first"

    storage.write_bytes(storage.join_uri(base, "images", "b.png"), b"b", so)
    storage.write_bytes(storage.join_uri(base, "images", "c.pt"), b"c", so)
    assert storage.list_names(storage.join_uri(base, "images"), so) == ["a.png", "b.png", "c.pt"]
    assert storage.list_names(storage.join_uri(base, "images"), so, suffix=".png") == ["a.png", "b.png"]
    assert storage.list_names(storage.join_uri(base, "images") + "/", so, suffix=".png") == ["a.png", "b.png"]

    storage.remove(uri, so)
    assert not storage.exists(uri, so)
    assert storage.list_names(storage.join_uri(base, "images"), so) == ["b.png", "c.pt"]
    storage.remove(uri, so)  # already gone: fine
    with pytest.raises(FileNotFoundError):
        storage.remove(uri, so, missing_ok=False)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri, so)


def test_overwrite_replaces_whole_object(store):
    base, so = store
    uri = storage.join_uri(base, "table.parquet")
    storage.write_bytes(uri, b"x" * 100_000, so)
    storage.write_bytes(uri, b"short", so)
    assert storage.read_bytes(uri, so) == b"short"


def test_list_names_missing_prefix_and_direct_children_only(store):
    base, so = store
    assert storage.list_names(storage.join_uri(base, "nothing-here"), so) == []
    storage.write_bytes(storage.join_uri(base, "top", "a.png"), b"a", so)
    storage.write_bytes(storage.join_uri(base, "top", "sub", "deep.png"), b"d", so)
    assert storage.list_names(storage.join_uri(base, "top"), so) == ["a.png"]
    # A prefix that is itself an object has nothing under it.
    assert storage.list_names(storage.join_uri(base, "top", "a.png"), so) == []


def test_check_writable_ok_and_leaves_nothing(store, request):
    base, so = store
    storage.check_writable(base, so)
    assert storage.list_names(base, so) == []
    # Raw listings (list_names hides probes on purpose).
    if base.startswith("s3://"):
        assert _keys(request.getfixturevalue("s3_server"), base.split("/", 3)[3]) == []
    else:
        assert os.listdir(base) == []


def test_memory_filesystem_round_trip():
    base = f"memory://ddim-{uuid.uuid4().hex}"
    storage.write_bytes(storage.join_uri(base, "x.png"), b"x")
    assert storage.read_bytes(storage.join_uri(base, "x.png")) == b"x"
    assert storage.list_names(base) == ["x.png"]
    storage.check_writable(base)


# --------------------------------------------------------------------------------------------------------------------
# Local atomicity


def test_local_write_creates_parents_and_leaves_no_temp(tmp_path):
    uri = str(tmp_path / "a" / "b" / "c" / "x.png")
    storage.write_bytes(uri, b"hello")
    assert Path(uri).read_bytes() == b"hello"
    storage.write_bytes(uri, b"hello again, longer")
    assert sorted(os.listdir(tmp_path / "a" / "b" / "c")) == ["x.png"]
    assert Path(uri).read_bytes() == b"hello again, longer"


def test_local_write_fsyncs_then_replaces(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync")
        return real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        assert Path(src).parent == Path(dst).parent  # same folder: rename cannot cross filesystems
        assert Path(src).name.startswith(".x.png.tmp-")
        assert Path(src).read_bytes() == b"data"  # complete before it becomes visible
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    storage.write_bytes(str(tmp_path / "x.png"), b"data")
    assert calls[:2] == ["fsync", "replace"]


def test_local_failed_write_keeps_old_object_and_no_temp(tmp_path, monkeypatch):
    uri = str(tmp_path / "x.png")
    storage.write_bytes(uri, b"old complete object")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        storage.write_bytes(uri, b"new object that never lands")
    monkeypatch.undo()
    assert Path(uri).read_bytes() == b"old complete object"
    assert os.listdir(tmp_path) == ["x.png"]


def test_local_list_names_skips_inflight_temp_files(tmp_path):
    storage.write_bytes(str(tmp_path / "a.png"), b"a")
    (tmp_path / f".b.png.tmp-{uuid.uuid4().hex}").write_bytes(b"half")
    (tmp_path / "folder").mkdir()
    assert storage.list_names(str(tmp_path)) == ["a.png"]
    assert storage.list_names(str(tmp_path), suffix=".png") == ["a.png"]


def test_check_writable_local_failure_is_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    out = str(blocker / "out")
    with pytest.raises(StorageError) as ei:
        storage.check_writable(out)
    assert isinstance(ei.value, OSError)
    assert out in str(ei.value)


# --------------------------------------------------------------------------------------------------------------------
# S3 specifics


def test_s3_object_visible_to_boto3(s3_server, s3_bucket):
    prefix = uuid.uuid4().hex
    uri = f"{s3_bucket}/{prefix}/images/a.png"
    storage.write_bytes(uri, b"png bytes", s3_server.storage_options)
    assert _keys(s3_server, prefix) == [f"{prefix}/images/a.png"]
    body = s3_server.client().get_object(Bucket=BUCKET, Key=f"{prefix}/images/a.png")["Body"].read()
    assert body == b"png bytes"


def test_s3_write_is_single_put(s3_server, s3_bucket):
    """6 MiB is over S3's 5 MiB minimum part size, yet must go as one PUT (multipart ETags end in -<parts>)."""
    prefix = uuid.uuid4().hex
    data = os.urandom(6 * 2**20)
    storage.write_bytes(f"{s3_bucket}/{prefix}/big.pt", data, s3_server.storage_options)
    head = s3_server.client().head_object(Bucket=BUCKET, Key=f"{prefix}/big.pt")
    assert head["ContentLength"] == len(data)
    assert "-" not in head["ETag"].strip('"')
    assert storage.read_bytes(f"{s3_bucket}/{prefix}/big.pt", s3_server.storage_options) == data


def test_s3_sees_writes_and_deletes_of_other_processes(s3_server, s3_bucket):
    """s3fs caches listings: objects another process writes or deletes must show up at once."""
    so = s3_server.storage_options
    prefix = uuid.uuid4().hex
    folder = f"{s3_bucket}/{prefix}/out"
    storage.write_bytes(f"{folder}/mine.png", b"m", so)
    assert storage.list_names(folder, so) == ["mine.png"]  # warms the s3fs listing cache
    assert not storage.exists(f"{folder}/theirs.png", so)

    script = (
        "import boto3, sys; c = boto3.client('s3');"
        "c.put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=b'theirs');"
        "c.delete_object(Bucket=sys.argv[1], Key=sys.argv[3])"
    )
    env = {**os.environ, **s3_server.env}
    subprocess.run(
        [sys.executable, "-c", script, BUCKET, f"{prefix}/out/theirs.png", f"{prefix}/out/mine.png"],
        env=env,
        check=True,
        timeout=60,
    )
    assert storage.exists(f"{folder}/theirs.png", so)
    assert not storage.exists(f"{folder}/mine.png", so)
    assert storage.list_names(folder, so) == ["theirs.png"]
    assert storage.read_bytes(f"{folder}/theirs.png", so) == b"theirs"


def test_s3_check_writable_ok(s3_server, s3_bucket):
    prefix = uuid.uuid4().hex
    storage.check_writable(f"{s3_bucket}/{prefix}/out", s3_server.storage_options)
    assert _keys(s3_server, prefix) == []


def test_s3_check_writable_missing_bucket_fails_fast(s3_server):
    out = "s3://no-such-bucket-xyz/out"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        storage.check_writable(out, s3_server.storage_options)
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert out in msg
    assert "not writable" in msg
    assert "\n" not in msg
    assert isinstance(ei.value, OSError)
    assert ei.value.__cause__ is not None


def test_s3_check_writable_wrong_credentials(s3_server, s3_bucket):
    so = s3_server.storage_options
    so["secret"] = "wrong-" + s3_server.secret_key
    out = f"{s3_bucket}/{uuid.uuid4().hex}"
    with pytest.raises(StorageError) as ei:
        storage.check_writable(out, so)
    assert out in str(ei.value)


def test_s3_list_names_missing_bucket_is_empty(s3_server):
    assert storage.list_names("s3://no-such-bucket-xyz/prefix", s3_server.storage_options) == []
    assert not storage.exists("s3://no-such-bucket-xyz/prefix/a.png", s3_server.storage_options)


# --------------------------------------------------------------------------------------------------------------------
# http_server fixture sanity


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_server_files_status_and_recording(http_server):
    name = f"{uuid.uuid4().hex}.png"
    (http_server.root / name).write_bytes(b"image bytes")
    http_server.requests.clear()
    assert _get(http_server.url(name)) == (200, b"image bytes")
    assert _get(http_server.url("missing.png"))[0] == 404
    assert _get(http_server.url("/status/503"))[0] == 503
    assert _get(http_server.url("/status/204"))[0] == 204
    assert http_server.requests == [f"/{name}", "/missing.png", "/status/503", "/status/204"]
    assert http_server.count(name) == 1


def test_http_server_flaky_then_ok(http_server):
    name = f"{uuid.uuid4().hex}.png"
    (http_server.root / name).write_bytes(b"eventually")
    key = uuid.uuid4().hex
    url = http_server.url(f"/flaky/{key}/{name}")
    assert _get(url)[0] == 500
    assert _get(url) == (200, b"eventually")
    assert _get(url) == (200, b"eventually")
    assert http_server.count(f"/flaky/{key}/{name}") == 3


def test_http_server_redirect_and_hang(http_server):
    name = f"{uuid.uuid4().hex}.png"
    (http_server.root / name).write_bytes(b"target")
    http_server.requests.clear()
    assert _get(http_server.url("/redirect?to=" + urllib.request.quote(http_server.url(name), safe=""))) == (
        200,
        b"target",
    )
    assert http_server.requests.snapshot()[-1] == f"/{name}"
    assert http_server.requests.snapshot()[0].startswith("/redirect?to=")
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError, OSError)):
        urllib.request.urlopen(http_server.url("/hang"), timeout=0.5).read()
    assert time.monotonic() - t0 < 5
    # The server still answers while a handler hangs.
    assert _get(http_server.url(name)) == (200, b"target")


def test_open_read_fetches_what_is_read_and_counts_it(store):
    """Ranged reads without read-ahead (a Parquet reader fetches its footer and a few columns of a large object),
    and every byte handed out counted in ``BYTES_READ``."""
    base, so = store
    data = bytes(range(256)) * 4096  # 1 MiB
    uri = storage.join_uri(base, "big.bin")
    storage.write_bytes(uri, data, so)
    storage.BYTES_READ.reset()
    with storage.open_read(uri, so) as handle:
        assert getattr(getattr(handle._raw, "cache", None), "name", "none") == "none"  # no fsspec block cache
        assert handle.seek(-8, 2) == len(data) - 8 and handle.read() == data[-8:]
        handle.seek(500_000)
        assert handle.read(100) == data[500_000:500_100]
        buffer = bytearray(50)
        assert handle.readinto(buffer) == 50 and bytes(buffer) == data[500_100:500_150] and handle.tell() == 500_150
    assert storage.BYTES_READ.reset() == (158, 3) and storage.BYTES_READ.bytes == 0
