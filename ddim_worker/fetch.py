"""Read images' bytes from manifest URLs: http(s), a local path, or an allowed object store (s3://, gs://, ...).

All the "may we?" decisions live in ``url_policy``; this module does the I/O, retries, deadlines and size limits.

``Fetcher`` is what a prepare task uses for its whole batch: one pooled ``requests.Session`` (connections reused
across the batch's images), a thread pool (``FetchPolicy.concurrency`` downloads at once) and per-row results in
order, where one row's failure never touches another. ``fetch_bytes`` fetches one URL with a throwaway ``Fetcher``.

DNS rebinding: every http(s) try (first try, each retry, each redirect hop) runs ``check_http_url`` and then
connects only to the addresses that check approved (``http_connections``). Proxies and ``.netrc`` credentials from
the environment are ignored (``make_session``): a proxy would connect past the pinning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import ssl
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import fsspec
import requests
from urllib3.exceptions import ReadTimeoutError
from urllib3.util import parse_url

from .http_connections import USER_AGENT, _ImageDeadline, _local, _norm_host, make_session  # noqa: F401 - re-exported
from .url_policy import (
    FetchError,
    FetchPolicy,
    Resolver,
    check_http_url,
    check_object_url,
    classify,
    default_resolver,
    join_relative,
    opt_out_directive,
    resolve_local_path,
)

from .worker_logging import _warn_once_a_minute, ensure_worker_logging  # noqa: F401

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024



# ---------------------------------------------------------------- retries


def backoff_seconds(policy: FetchPolicy, k: int) -> float:
    """The wait before retry ``k`` (0-based): between half and all of ``backoff_s * 2**k`` (jittered)."""
    full = policy.backoff_s * 2**k
    return random.uniform(full / 2, full)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _retry_loop(url: str, attempt, policy: FetchPolicy, deadline: _ImageDeadline):
    """``attempt()``, retried while it raises a retryable ``FetchError``, within the image's deadline."""
    for k in range(policy.retries + 1):
        deadline.check(url)
        try:
            return attempt()
        except FetchError as e:
            if deadline.expired:
                raise deadline.timeout_error(url) from None
            if not e.retryable or k == policy.retries:
                raise
            if e.retry_after is not None:
                wait = e.retry_after * random.uniform(1.0, 1.1)  # never sooner than asked
                _warn_once_a_minute(f"throttle:{urlsplit(url).netloc}", "%s asks us to wait %.0f s (%s)",
                                    urlsplit(url).netloc, e.retry_after, e.message)
            else:
                wait = backoff_seconds(policy, k)
            if wait >= deadline.remaining():
                raise FetchError(e.code, f"{e.message} (not retried: waiting {wait:.1f} s would pass the image's "
                                         f"{policy.deadline_s:g} s deadline)") from None
            log.info("retry %d of %s in %.2f s: %s", k + 1, url, wait, e)
        time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the fetcher


class Fetcher:
    """Fetches the images of one task: ``fetch(url)`` for one, ``fetch_all(urls)`` for a batch, concurrently.

    ``base_uri`` is the manifest's folder as a URL or path (relative image paths resolve against it; its bucket is
    the one object-store URLs may read, see ``check_object_url``); ``base_dir`` is that folder on local disk when
    the manifest is local (None otherwise). ``resolve`` is the DNS resolver used for the SSRF check, and the
    addresses it returns are the only ones connected to. Thread-safe; not picklable: build it inside the task.
    """

    def __init__(
        self,
        policy: FetchPolicy = FetchPolicy(),
        storage_options: dict | None = None,
        base_uri: str | None = None,
        base_dir: str | None = None,
        *,
        resolve: Resolver = default_resolver,
    ):
        self.policy = policy
        self.storage_options = dict(storage_options or {})
        self.base_uri = base_uri
        self.base_dir = base_dir
        self.resolve = resolve
        self._session: requests.Session | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- lifetime
    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            session, self._session = self._session, None
        if pool is not None:
            pool.shutdown(wait=True)
        if session is not None:
            session.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                self._session = make_session(self.policy)
            return self._session

    # -- many
    def fetch_all(self, urls: Sequence[str]) -> list[bytes | FetchError]:
        """One result per URL, in order: its bytes, or the ``FetchError`` it failed with (never raises for a row;
        an unexpected exception becomes ``FetchError("fetch_failed", ...)`` with the original as its cause)."""
        results: list = [None] * len(urls)
        for i, result in self.iter_fetch(urls):
            results[i] = result
        return results

    def iter_fetch(self, urls: Sequence[str]) -> Iterator[tuple[int, bytes | FetchError]]:
        """``(index, bytes or FetchError)`` as each download finishes (decode while others still download)."""
        urls = list(urls)
        if self.policy.concurrency <= 1 or len(urls) <= 1:
            for i, url in enumerate(urls):
                yield i, self._fetch_one(url)
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.policy.concurrency, thread_name_prefix="ddim-fetch")
            pool = self._pool
        futures = {pool.submit(self._fetch_one, url): i for i, url in enumerate(urls)}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def _fetch_one(self, url) -> bytes | FetchError:
        try:
            if not isinstance(url, str) or not url.strip():
                return FetchError("bad_setting", "the row has no image: image_url is empty")
            return self.fetch(url.strip())
        except FetchError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a bug or surprise fails this row only, and says so in the log
            log.warning("unexpected error fetching %s", url, exc_info=True)
            err = FetchError("fetch_failed", f"{url}: {type(e).__name__}: {e}")
            err.__cause__ = e
            return err

    # -- one
    def fetch(self, url: str) -> bytes:
        """The bytes at ``url`` (b"" for an empty object: the decoder reports that), or raises ``FetchError``."""
        deadline = _ImageDeadline(self.policy.deadline_s)
        try:
            return self._dispatch(url, deadline)
        finally:
            deadline.finish()

    def _dispatch(self, url: str, deadline: _ImageDeadline) -> bytes:
        policy, base_uri, base_dir = self.policy, self.base_uri, self.base_dir
        kind = classify(url)
        if kind == "local":
            if base_uri and not _is_absolute_local(url):
                base_kind = classify(base_uri)
                if base_kind == "http":
                    return self._fetch_http(join_relative(base_uri, url), deadline)
                if base_kind == "fsspec":
                    return self._fetch_fsspec(join_relative(base_uri, url), deadline)
                if base_dir is None:  # a local manifest given only as base_uri
                    base_dir = resolve_local_path(base_uri, None, FetchPolicy(allow_local_files=True))
            return _read_local(resolve_local_path(url, base_dir, policy), policy)
        if kind == "http":
            return self._fetch_http(url, deadline)
        return self._fetch_fsspec(url, deadline)

    # -- http(s)
    def _fetch_http(self, url: str, deadline: _ImageDeadline) -> bytes:
        s = self.session()
        deadline.watch()
        for _ in range(self.policy.max_redirects + 1):
            body, location = _retry_loop(url, lambda: self._http_once(s, url, deadline), self.policy, deadline)
            if location is None:
                return body
            url = urljoin(url, location)  # checked by the next hop's first try, before it connects
        raise FetchError("fetch_failed", f"{url}: more than {self.policy.max_redirects} redirects")

    def _http_once(self, s: requests.Session, url: str, deadline: _ImageDeadline) -> tuple[bytes, str | None]:
        """One checked, pinned GET: (body, None), or (b"", Location) for a redirect."""
        policy = self.policy
        url = _as_requests_sends(url)
        addresses = check_http_url(url, policy, self.resolve)  # every try re-checks: DNS may have changed
        parts = parse_url(url)
        port = parts.port or (443 if (parts.scheme or "").lower() == "https" else 80)
        timeout = max(0.001, min(policy.timeout_s, deadline.remaining()))
        _local.pin, _local.deadline = (_norm_host(parts.host or ""), port, list(addresses)), deadline
        r = None
        try:
            r = s.get(url, stream=True, allow_redirects=False, timeout=(timeout, timeout))
            location = s.get_redirect_target(r)
            if location:
                return b"", location
            _check_response(r, url, policy)
            return _read_body(r, url, policy, deadline), None
        except requests.RequestException as e:
            raise _request_error(e, url, policy, deadline) from None
        finally:
            deadline.end_attempt()  # before the connection goes back to the pool
            _local.pin = _local.deadline = None
            if r is not None:
                r.close()

    # -- object stores (s3://, gs://, az://, hf://, memory://)
    def _fetch_fsspec(self, url: str, deadline: _ImageDeadline) -> bytes:
        check_object_url(url, self.base_uri, self.policy)
        policy, storage_options = self.policy, self.storage_options

        def attempt() -> bytes:
            try:
                of = fsspec.open(url, "rb", **storage_options)
                try:
                    size = of.fs.size(of.path)
                except NotImplementedError:
                    size = None
                if size is not None and size > policy.max_bytes:
                    raise FetchError("too_large", f"{url} is {size} bytes, more than {policy.max_bytes}")
                with of as f:
                    data = f.read(policy.max_bytes + 1)
            except FetchError:
                raise
            except FileNotFoundError:
                raise FetchError("not_found", f"{url} does not exist") from None
            except Exception as e:  # noqa: BLE001 - any backend error becomes a FetchError with its type and message
                transient = _is_transient(e)
                code = "fetch_timeout" if transient and isinstance(e, TimeoutError) else "fetch_failed"
                raise FetchError(code, f"{url}: {type(e).__name__}: {e}", retryable=transient) from None
            if len(data) > policy.max_bytes:
                raise FetchError("too_large", f"{url} is larger than {policy.max_bytes} bytes")
            return data

        data = _retry_loop(url, attempt, policy, deadline)
        if deadline.remaining() <= 0:
            raise deadline.timeout_error(url)
        return data


def _in_chain(exc: BaseException | None, kind: type) -> bool:
    """Whether an exception of ``kind`` is anywhere in ``exc``'s causes, contexts, args or urllib3 ``reason``s."""
    todo, seen = [exc], 0
    while todo and seen < 50:
        e = todo.pop()
        seen += 1
        if not isinstance(e, BaseException):
            continue
        if isinstance(e, kind):
            return True
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())])
    return False


# One Fetcher per (policy, storage options, manifest) per worker process, so that the connections of one batch
# serve the next batches of the same job too.
_shared: dict[str, Fetcher] = {}
_shared_lock = threading.Lock()
_SHARED_MAX = 4


def shared_fetcher(
    policy: FetchPolicy = FetchPolicy(),
    storage_options: dict | None = None,
    base_uri: str | None = None,
    base_dir: str | None = None,
) -> Fetcher:
    """A process-wide ``Fetcher`` for these arguments (created on first use; do not ``close()`` it)."""
    key = json.dumps([repr(policy), storage_options or {}, base_uri, base_dir, os.getpid()], sort_keys=True,
                     default=repr)
    with _shared_lock:
        fetcher = _shared.get(key)
        if fetcher is None:
            while len(_shared) >= _SHARED_MAX:
                _shared.pop(next(iter(_shared))).close()
            fetcher = _shared[key] = Fetcher(policy, storage_options, base_uri, base_dir)
        return fetcher


def fetch_bytes(
    url: str,
    *,
    base_dir: str | None = None,
    base_uri: str | None = None,
    policy: FetchPolicy = FetchPolicy(),
    storage_options: dict | None = None,
    resolve: Resolver = default_resolver,
) -> bytes:
    """The bytes at ``url`` (b"" for an empty object: the decoder reports that), or ``FetchError``.

    ``base_dir`` is the manifest's folder when the manifest is local; ``base_uri`` is that folder as a URL (e.g.
    ``s3://bucket/manifests``): relative paths in a remote manifest are read from there. For a batch, use one
    ``Fetcher`` instead (one session, connections reused, concurrent downloads).
    """
    with Fetcher(policy, storage_options, base_uri, base_dir, resolve=resolve) as fetcher:
        return fetcher.fetch(url)


def _as_requests_sends(url: str) -> str:
    """The URL as requests will send it (IDNA host, quoting), so that the check and the pin see its host."""
    try:
        prepared = requests.models.PreparedRequest()
        prepared.prepare_url(url.strip(), None)
        return prepared.url or url
    except requests.RequestException as e:
        raise FetchError("unsafe_url", f"malformed URL {url!r}: {e}") from None


def _is_absolute_local(url: str) -> bool:
    return os.path.isabs(url) or urlsplit(url).scheme.lower() == "file"


def _read_local(path: str, policy: FetchPolicy) -> bytes:
    """A local image's bytes. Opened non-blocking and checked to be a regular file before any read: a FIFO would
    block the task until some writer came, a device (``/dev/zero``, a tty) would never end or never answer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FetchError("not_found", f"{path} does not exist") from None
    except OSError as e:
        raise FetchError("fetch_failed", f"{path}: {type(e).__name__}: {e}") from None
    try:
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise FetchError("unsafe_url", f"{path} is not a regular file ({_file_kind(mode)}): not read")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise FetchError("fetch_failed", f"{path}: {type(e).__name__}: {e}") from None
    if len(data) > policy.max_bytes:
        raise FetchError("too_large", f"{path} is larger than {policy.max_bytes} bytes")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def redirect_target(current_url: str, location: str, policy: FetchPolicy, resolve: Resolver = default_resolver) -> str:
    """The absolute URL a redirect points to, checked with ``check_http_url`` before anything connects to it."""
    target = urljoin(current_url, location)
    check_http_url(target, policy, resolve)
    return target


# ---------------------------------------------------------------- transient object-store errors

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "500", "502", "503", "504"}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED}


def _is_transient(exc: BaseException | None) -> bool:
    """Throttling/5xx/connection trouble anywhere in the cause chain (s3fs re-raises botocore errors as OSError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(exc, "response", None)  # botocore.exceptions.ClientError, without importing botocore
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _TRANSIENT_CODES or status == 429 or (isinstance(status, int) and status >= 500):
                return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _check_response(r: requests.Response, url: str, policy: FetchPolicy) -> None:
    """Refuse what the answer's status and headers already rule out, before any of the body is read."""
    status = r.status_code
    if status in (404, 410):
        raise FetchError("not_found", f"{url}: HTTP {status}")
    if status in (429, 503):
        wait = retry_after_seconds(r.headers.get("Retry-After"))
        note = f" (Retry-After {r.headers.get('Retry-After')})" if wait is not None else ""
        raise FetchError("fetch_failed", f"{url}: HTTP {status}{note}", retryable=True, retry_after=wait)
    if status >= 500:
        raise FetchError("fetch_failed", f"{url}: HTTP {status}", retryable=True)
    if not 200 <= status < 300:
        raise FetchError("fetch_failed", f"{url}: HTTP {status}")
    if policy.disallowed_directives:
        tags = r.raw.headers.getlist("X-Robots-Tag") if hasattr(r.raw, "headers") else []
        directive = opt_out_directive(tags or [r.headers.get("X-Robots-Tag", "")], policy.disallowed_directives)
        if directive:
            raise FetchError("opted_out", f"{url}: the server opts this image out of AI use "
                                          f"(X-Robots-Tag: {directive}); --no-respect-opt-outs ignores it")
    length = r.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise FetchError("too_large", f"{url}: Content-Length {length} > {policy.max_bytes} bytes")


def _read_body(r: requests.Response, url: str, policy: FetchPolicy, deadline: _ImageDeadline) -> bytes:
    """The body, bounded in bytes (decoded: also bounds a gzip bomb) and by the image's deadline."""
    body = bytearray()
    for chunk in r.iter_content(_CHUNK):
        body += chunk
        if len(body) > policy.max_bytes:
            raise FetchError("too_large", f"{url}: body larger than {policy.max_bytes} bytes")
        if deadline.remaining() <= 0:
            raise deadline.timeout_error(url)
    if deadline.expired:  # the watchdog cut a body with no length: what came is not the whole image
        raise deadline.timeout_error(url)
    return bytes(body)


def _request_error(e: requests.RequestException, url: str, policy: FetchPolicy,
                   deadline: _ImageDeadline) -> FetchError:
    """The row error a failed request means: a timeout, a permanent failure, or one worth retrying."""
    if isinstance(e, requests.Timeout):
        if deadline.expired or deadline.remaining() <= 0:
            return deadline.timeout_error(url)
        return FetchError("fetch_timeout", f"{url}: timed out after {policy.timeout_s} s ({e})", retryable=True)
    if deadline.expired:
        return deadline.timeout_error(url)
    if isinstance(e, requests.exceptions.SSLError):
        # A certificate that does not match the host name will not match on a retry either.
        permanent = _in_chain(e, ssl.SSLCertVerificationError)
        return FetchError("fetch_failed", f"{url}: {type(e).__name__}: {e}", retryable=not permanent)
    if isinstance(e, requests.ConnectionError):
        # A read timeout in the middle of the body comes back from iter_content as a ConnectionError.
        if e.args and isinstance(e.args[0], ReadTimeoutError):
            return FetchError("fetch_timeout", f"{url}: timed out after {policy.timeout_s} s", retryable=True)
        return FetchError("fetch_failed", f"{url}: {type(e).__name__}: {e}", retryable=True)
    # invalid URL, broken chunked encoding (retried), decode errors...
    transient = isinstance(e, requests.exceptions.ChunkedEncodingError)
    return FetchError("fetch_failed", f"{url}: {type(e).__name__}: {e}", retryable=transient)
