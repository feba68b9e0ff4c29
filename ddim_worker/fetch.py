"""Read one image's bytes from a manifest URL: http(s), a local path, or any object store fsspec knows (s3://...).

All the "may we?" decisions live in ``url_policy``; this module does the I/O, retries and size limits.
"""

from __future__ import annotations

import errno
import os
import time
from urllib.parse import urljoin, urlsplit

import fsspec
import requests
from urllib3.exceptions import ReadTimeoutError

from .url_policy import (
    FetchError,
    FetchPolicy,
    Resolver,
    check_http_url,
    classify,
    default_resolver,
    join_relative,
    resolve_local_path,
)

_CHUNK = 64 * 1024


def fetch_bytes(
    url: str,
    *,
    base_dir: str | None = None,
    base_uri: str | None = None,
    policy: FetchPolicy = FetchPolicy(),
    storage_options: dict | None = None,
    session: requests.Session | None = None,
) -> bytes:
    """The bytes at ``url`` (b"" for an empty object: the decoder reports that), or ``FetchError``.

    ``base_dir`` is the manifest's folder when the manifest is local; ``base_uri`` is that folder as a URL (e.g.
    ``s3://bucket/manifests``): relative paths in a remote manifest are read from there.
    """
    kind = classify(url)
    if kind == "local":
        if base_uri and not _is_absolute_local(url):
            base_kind = classify(base_uri)
            if base_kind == "http":
                return _fetch_http(join_relative(base_uri, url), policy, session)
            if base_kind == "fsspec":
                return _fetch_fsspec(join_relative(base_uri, url), policy, storage_options)
            if base_dir is None:  # a local manifest given only as base_uri
                base_dir = resolve_local_path(base_uri, None, FetchPolicy(allow_local_files=True))
        return _read_local(resolve_local_path(url, base_dir, policy), policy)
    if kind == "http":
        return _fetch_http(url, policy, session)
    return _fetch_fsspec(url, policy, storage_options)


def _is_absolute_local(url: str) -> bool:
    return os.path.isabs(url) or urlsplit(url).scheme.lower() == "file"


def _read_local(path: str, policy: FetchPolicy) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except FileNotFoundError:
        raise FetchError("not_found", f"{path} does not exist") from None
    except OSError as e:
        raise FetchError("fetch_failed", f"{path}: {type(e).__name__}: {e}") from None
    if len(data) > policy.max_bytes:
        raise FetchError("too_large", f"{path} is larger than {policy.max_bytes} bytes")
    return data


def _with_retries(attempt, policy: FetchPolicy):
    """``attempt()``, retried with exponential backoff while it raises a retryable ``FetchError``."""
    for k in range(policy.retries + 1):
        try:
            return attempt()
        except FetchError as e:
            if not e.retryable or k == policy.retries:
                raise
        time.sleep(policy.backoff_s * 2**k)


# ---------------------------------------------------------------- http(s)


def redirect_target(current_url: str, location: str, policy: FetchPolicy, resolve: Resolver = default_resolver) -> str:
    """The absolute URL a redirect points to, checked with ``check_http_url`` before anything connects to it."""
    target = urljoin(current_url, location)
    check_http_url(target, policy, resolve)
    return target


def _fetch_http(url: str, policy: FetchPolicy, session: requests.Session | None) -> bytes:
    # The address check runs on every hop, but requests resolves the name again when it connects: a DNS server
    # that answers "public" to us and "private" a moment later (DNS rebinding) is not stopped. Closing that window
    # would mean pinning the checked address in a custom transport adapter; literal IPs have no such window.
    check_http_url(url, policy)
    own = session is None
    s = session or requests.Session()
    try:
        for _ in range(policy.max_redirects + 1):
            body, location = _with_retries(lambda: _http_once(s, url, policy), policy)
            if location is None:
                return body
            url = redirect_target(url, location, policy)
        raise FetchError("fetch_failed", f"{url}: more than {policy.max_redirects} redirects")
    finally:
        if own:
            s.close()


def _http_once(s: requests.Session, url: str, policy: FetchPolicy) -> tuple[bytes, str | None]:
    """One GET: (body, None), or (b"", Location) for a redirect."""
    try:
        with s.get(url, stream=True, allow_redirects=False, timeout=(policy.timeout_s, policy.timeout_s)) as r:
            location = s.get_redirect_target(r)
            if location:
                return b"", location
            status = r.status_code
            if status in (404, 410):
                raise FetchError("not_found", f"{url}: HTTP {status}")
            if status == 429 or status >= 500:
                raise FetchError("fetch_failed", f"{url}: HTTP {status}", retryable=True)
            if not 200 <= status < 300:
                raise FetchError("fetch_failed", f"{url}: HTTP {status}")
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError("too_large", f"{url}: Content-Length {length} > {policy.max_bytes} bytes")
            body = bytearray()
            for chunk in r.iter_content(_CHUNK):  # decoded bytes: also bounds a gzip bomb
                body += chunk
                if len(body) > policy.max_bytes:
                    raise FetchError("too_large", f"{url}: body larger than {policy.max_bytes} bytes")
            return bytes(body), None
    except requests.Timeout as e:
        msg = f"{url}: timed out after {policy.timeout_s} s ({e})"
        raise FetchError("fetch_timeout", msg, retryable=True) from None
    except requests.ConnectionError as e:
        # A read timeout in the middle of the body comes back from iter_content as a ConnectionError.
        if e.args and isinstance(e.args[0], ReadTimeoutError):
            raise FetchError("fetch_timeout", f"{url}: timed out after {policy.timeout_s} s", retryable=True) from None
        raise FetchError("fetch_failed", f"{url}: {type(e).__name__}: {e}", retryable=True) from None
    except requests.RequestException as e:  # invalid URL, broken chunked encoding (retried), decode errors...
        transient = isinstance(e, requests.exceptions.ChunkedEncodingError)
        raise FetchError("fetch_failed", f"{url}: {type(e).__name__}: {e}", retryable=transient) from None


# ---------------------------------------------------------------- fsspec (s3://, gs://, memory://...)

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


def _fetch_fsspec(url: str, policy: FetchPolicy, storage_options: dict | None) -> bytes:
    def attempt() -> bytes:
        try:
            of = fsspec.open(url, "rb", **(storage_options or {}))
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

    return _with_retries(attempt, policy)
