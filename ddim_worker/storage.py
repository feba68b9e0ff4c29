"""Object storage helpers over fsspec: local paths, ``s3://`` and anything else fsspec can open.

Why these wrappers exist:

- Every object is written whole or not at all, so a killed worker never leaves a half image/latent that a rerun
  would mistake for finished work (local disk: temp file + fsync + ``os.replace``; object stores: one PUT).
- s3fs caches directory listings per process; the job decides "already done?" from listings that other processes
  (other Ray workers, an earlier run) change, so ``exists``/``list_names`` always look at the store itself.
- A dead bucket or wrong credentials should fail the job before any GPU time is spent (``check_writable``).
- Reading a few columns of a Parquet object should fetch those columns, not the object (``open_read``: ranged
  reads, no read-ahead), and tests and benchmarks should be able to tell what was fetched (``BYTES_READ``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "StorageError",
    "join_uri",
    "filesystem",
    "write_bytes",
    "open_write",
    "read_bytes",
    "open_read",
    "BYTES_READ",
    "exists",
    "list_names",
    "remove",
    "check_writable",
    "PreconditionFailed",
    "create_exclusive",
    "replace_if",
    "remove_if",
    "version_of",
    "store_now",
]

#: Name prefix of the probe object ``check_writable`` writes and deletes.
PROBE_PREFIX = ".ddim-edit-probe-"

# Temp files of in-flight local writes (``.<name>.tmp-<uuid hex>``) and probe objects are never "results".
_INTERNAL_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$|^" + re.escape(PROBE_PREFIX))


class StorageError(OSError):
    """The output location cannot be used (missing bucket, bad credentials, read-only folder, ...)."""


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or a URL (``s3://bucket/prefix``) with single slashes.

    Parts are always relative to ``base`` (``os.path.join`` would drop everything before a part starting with
    ``/``); URLs are joined with ``/`` whatever the OS, local paths with ``os.path.join``.
    """
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if not clean:
        return base
    if "://" in base:
        scheme, rest = base.split("://", 1)
        lead = "/" if rest.startswith("/") else ""  # file:///abs/path keeps its root
        body = rest.strip("/")
        return f"{scheme}://{lead}" + "/".join([body, *clean] if body else clean)
    return os.path.join(base, *clean)


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``uri`` and the path inside it (protocol stripped)."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _invalidate(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop cached listings for ``path`` and its parents (s3fs keeps a per-process dircache)."""
    try:
        fs.invalidate_cache(path)
    except Exception:  # pragma: no cover - caches are an optimisation, never a reason to fail
        pass


def _fsync_dir(folder: str) -> None:
    """Persist the rename itself (the directory entry), where the OS allows opening a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[Any]:
    """A temp file beside ``path``: fsynced and renamed onto it when the block ends, removed if the block fails."""
    folder, name = os.path.split(path)
    folder = folder or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old object, or the new one whole, never a part.

    Local disk: temp file in the same folder, fsync, ``os.replace`` (parent folders are created).
    Object stores: a single ``pipe`` (one PUT for our sizes; S3 makes a PUT visible only once complete).
    """
    fs, path = filesystem(uri, storage_options)
    if _is_local(fs):
        with _local_atomic(path) as handle:
            handle.write(data)
        return
    fs.pipe_file(path, bytes(data))
    _invalidate(fs, path)


@contextlib.contextmanager
def open_write(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[Any]:
    """A binary file to stream a large object into, seen whole or not at all: on local disk a temp file renamed into
    place on success (removed on failure); on object stores fsspec's upload, which S3 makes visible only once the
    (multipart) upload completes."""
    fs, path = filesystem(uri, storage_options)
    if _is_local(fs):
        with _local_atomic(path) as handle:
            yield handle
        return
    handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        _discard(handle)  # fsspec's __exit__ would commit what was written so far: a file with no end (no footer)
        raise
    handle.close()
    _invalidate(fs, path)


def _discard(handle: Any) -> None:
    """Throw away an upload in progress: the multipart upload is aborted and nothing becomes visible."""
    try:
        handle.discard()
    except Exception:  # noqa: BLE001 - aborting is best effort; the object is not committed either way
        pass
    handle.closed = True  # close() (also from __del__) must not commit the buffer


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole object (raises ``FileNotFoundError`` when it does not exist)."""
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path)


class ReadCounter:
    """Bytes handed out by the files ``open_read`` opens in this process (Ray workers count in their own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.reads = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes += count
            self.reads += 1

    def reset(self) -> tuple[int, int]:
        """Zero the counts; returns (bytes, reads) as they were."""
        with self._lock:
            counts, self.bytes, self.reads = (self.bytes, self.reads), 0, 0
        return counts


BYTES_READ = ReadCounter()


class CountingReader(io.RawIOBase):
    """A read-only file that adds the bytes each read returns to ``BYTES_READ``; everything else is the wrapped
    file's (seeks cost nothing, so what is counted is what was fetched)."""

    def __init__(self, raw: Any, counter: ReadCounter = BYTES_READ) -> None:
        super().__init__()
        self._raw, self._counter = raw, counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._counter.add(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[:len(data)] = data
        self._counter.add(len(data))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_read(uri: str, storage_options: dict[str, Any] | None = None) -> CountingReader:
    """An object opened for ranged reads: each read fetches what it asks for and nothing more (fsspec's caches would
    read ahead a block of megabytes), so a Parquet reader fetches the footer and the column chunks it needs. Bytes
    read are counted in ``BYTES_READ``."""
    fs, path = filesystem(uri, storage_options)
    return CountingReader(fs.open(path, "rb") if _is_local(fs) else fs.open(path, "rb", cache_type="none"))


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``uri`` exists now, including objects written by other processes since our last listing."""
    fs, path = filesystem(uri, storage_options)
    _invalidate(fs, path)
    return bool(fs.exists(path))


def list_names(
    prefix_uri: str, storage_options: dict[str, Any] | None = None, suffix: str | None = None
) -> list[str]:
    """Sorted basenames of the objects directly under ``prefix_uri`` (no sub-folders; ``[]`` if it is missing).

    Reads the store itself, not a cached listing, so objects written by other workers are seen. Temp files of
    in-flight local writes and ``check_writable`` probes are left out. ``suffix`` keeps only names ending in it.
    """
    fs, path, entries = _listing(prefix_uri, storage_options)
    names: list[str] = []
    own = fs._strip_protocol(path).rstrip("/")
    for entry in entries:
        if entry.get("type") != "file":
            continue
        full = str(entry["name"]).rstrip("/")
        if full == own:  # ``ls`` on an object returns the object itself: it is not "under" the prefix
            continue
        name = posixpath.basename(full)
        if not name or _INTERNAL_NAME.match(name):
            continue
        if suffix is not None and not name.endswith(suffix):
            continue
        names.append(name)
    return sorted(names)


def list_folders(prefix_uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted basenames of the folders (common prefixes) directly under ``prefix_uri``; ``[]`` if it is missing."""
    _, _, entries = _listing(prefix_uri, storage_options)
    return sorted(posixpath.basename(str(e["name"]).rstrip("/")) for e in entries if e.get("type") == "directory")


def _listing(prefix_uri: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str,
                                                                                list[dict[str, Any]]]:
    """(filesystem, path, entries directly under ``prefix_uri``) from the store itself, never a cached listing."""
    fs, path = filesystem(prefix_uri, storage_options)
    path = path.rstrip("/") or path
    _invalidate(fs, path)
    try:
        return fs, path, fs.ls(path, detail=True, refresh=True)
    except (FileNotFoundError, NotADirectoryError):
        return fs, path, []


def remove_tree(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a folder and everything under it (nothing if it is missing)."""
    fs, path = filesystem(uri, storage_options)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    finally:
        _invalidate(fs, path)


def remove(uri: str, storage_options: dict[str, Any] | None = None, missing_ok: bool = True) -> None:
    """Delete one object; a missing object is fine unless ``missing_ok`` is False."""
    fs, path = filesystem(uri, storage_options)
    try:
        if _is_local(fs):
            os.unlink(path)
        else:
            if not missing_ok and not exists(uri, storage_options):
                raise FileNotFoundError(uri)
            fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    finally:
        _invalidate(fs, path)


def check_writable(output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write and delete a small probe object under ``output_uri`` so a dead bucket or bad credentials fail fast.

    Raises ``StorageError`` naming the URI and the cause; the original exception is chained.
    """
    probe = join_uri(output_uri, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ddim-edit write probe\n", storage_options)
        remove(probe, storage_options)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot write there"
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise StorageError(f"output location {output_uri!r} is not writable ({cause})") from exc


_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def remove_stale_temp_files(prefix_uri: str, storage_options: dict[str, Any] | None = None, *,
                            older_than: float) -> int:
    """Delete temp files a killed writer left under a local prefix (object stores have none: a PUT is whole).

    Only those last written before ``older_than`` (epoch seconds): a temp file newer than that may be another
    writer's write in flight (a shared latent cache), and is left alone. Returns how many were removed.
    """
    fs, root = filesystem(prefix_uri, storage_options)
    if not _is_local(fs) or not os.path.isdir(root):
        return 0
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if _TEMP_NAME.match(name) and os.stat(path).st_mtime < older_than:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile
    return removed


# -- conditional writes: what a lease needs ------------------------------------------------------------------------

class PreconditionFailed(OSError):
    """A conditional write or delete found the object other than expected (created, changed or removed by another
    writer since we last saw it)."""


def _is_precondition_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-condition" in str(exc).lower() \
                or "precondition" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """Serialise conditional writes to one local object across processes (``flock`` on a sidecar file)."""
    import fcntl

    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    fd = os.open(os.path.join(folder or ".", f".{name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _local_version(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def version_of(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, float]:
    """(version, last modified as epoch seconds by the store's clock) of an object; ``FileNotFoundError`` if none.

    The version is the S3 ETag, or a digest of a local file's bytes: what ``replace_if`` and ``remove_if`` compare."""
    fs, path = filesystem(uri, storage_options)
    if _is_local(fs):
        return _local_version(path), os.stat(path).st_mtime
    _invalidate(fs, path)
    info = fs.info(path)
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    when = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0.0)
    return str(info.get("ETag") or info.get("etag") or info.get("checksum") or ""), when


def create_exclusive(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> str:
    """Create ``uri`` only if no object has that name (S3 ``If-None-Match: *``, local ``O_EXCL``); returns its
    version. Raises ``PreconditionFailed`` when it exists."""
    fs, path = filesystem(uri, storage_options)
    if _is_local(fs):
        with _local_lock(path):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise PreconditionFailed(f"{uri} exists") from None
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return hashlib.sha256(data).hexdigest()
    return _conditional_put(fs, path, uri, data, storage_options, f"{uri} exists", mode="create")


def replace_if(uri: str, data: bytes, version: str, storage_options: dict[str, Any] | None = None) -> str:
    """Replace ``uri`` only if it is still at ``version`` (S3 ``If-Match``); returns the new version. Raises
    ``PreconditionFailed`` when another writer changed or removed it."""
    fs, path = filesystem(uri, storage_options)
    if _is_local(fs):
        with _local_lock(path):
            try:
                current = _local_version(path)
            except FileNotFoundError:
                raise PreconditionFailed(f"{uri} is gone") from None
            if current != version:
                raise PreconditionFailed(f"{uri} was changed by another writer")
            with _local_atomic(path) as handle:
                handle.write(data)
            return hashlib.sha256(data).hexdigest()
    return _conditional_put(fs, path, uri, data, storage_options, f"{uri} was changed or removed by another writer",
                            IfMatch=version)


def _conditional_put(fs: fsspec.AbstractFileSystem, path: str, uri: str, data: bytes,
                     storage_options: dict[str, Any] | None, refused: str, **condition: Any) -> str:
    """One PUT under ``condition`` (``mode="create"``: If-None-Match; ``IfMatch=etag``); the new ETag, or
    ``PreconditionFailed(refused)`` when the store refuses it."""
    try:
        out = fs.pipe_file(path, bytes(data), **condition)
    except FileNotFoundError:
        raise PreconditionFailed(refused) from None
    except Exception as exc:
        if _is_precondition_failure(exc):
            raise PreconditionFailed(refused) from None
        raise
    finally:
        _invalidate(fs, path)
    return str((out or {}).get("ETag") or version_of(uri, storage_options)[0])


def remove_if(uri: str, version: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete ``uri`` only if it is still at ``version``; returns whether it was deleted (False: another writer's
    object now, left alone)."""
    fs, path = filesystem(uri, storage_options)
    if _is_local(fs):
        with _local_lock(path):
            try:
                if _local_version(path) != version:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
    except FileNotFoundError:
        return False
    except Exception as exc:
        if _is_precondition_failure(exc):
            return False
        raise
    finally:
        _invalidate(fs, path)
    return True


def store_now(folder_uri: str, storage_options: dict[str, Any] | None = None) -> float:
    """The store's clock, now: the last-modified time of a probe object written and removed under ``folder_uri``.
    Comparing it with an object's last-modified time measures an age without trusting any host's clock."""
    probe = join_uri(folder_uri, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    write_bytes(probe, b"", storage_options)
    try:
        return version_of(probe, storage_options)[1]
    finally:
        remove(probe, storage_options)
