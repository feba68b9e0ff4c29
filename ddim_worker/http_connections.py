"""HTTP connections for image fetching: pinned to the addresses the URL policy checked, and cut at a deadline.

DNS rebinding: ``PinnedAdapter``'s connections connect only to the addresses ``check_http_url`` approved for this
thread's try (``_local.pin``): the name is not resolved a second time at connect, while the Host header, TLS SNI and
certificate check still use the host name. A new connection to a host whose addresses this thread did not just check
is refused (fail closed). ``_ImageDeadline`` and the watchdog thread shut an image's sockets when its deadline passes,
so a server trickling bytes cannot hold a worker past it.
"""

from __future__ import annotations

import heapq
import http.cookiejar
import importlib.metadata
import itertools
import os
import socket
import sys
import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from .url_policy import FetchError, FetchPolicy


def _version() -> str:
    try:
        return importlib.metadata.version("ddim-edit")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


#: What every image request says it is: the project and its version.
USER_AGENT = f"ddim-edit/{_version()} (+batch image editing)"


# ---------------------------------------------------------------- deadline per image


class _ImageDeadline:
    """The deadline of one image's fetch, over every hop, try and wait. For http(s) the watchdog shuts the sockets
    of the connections this fetch is using when the deadline passes, so a server trickling bytes cannot hold a
    worker past it."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.end = time.monotonic() + deadline_s
        self.expired = False
        self._finished = False
        self._conns: set = set()
        self._lock = threading.Lock()
        self._watched = False

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, url: str) -> None:
        if self.expired or self.remaining() <= 0:
            raise self.timeout_error(url)

    def timeout_error(self, url: str) -> FetchError:
        return FetchError("fetch_timeout", f"{url}: no complete answer within the {self.deadline_s:g} s deadline")

    def watch(self) -> None:
        if not self._watched:
            self._watched = True
            _WATCHDOG.schedule(self)

    def register(self, conn_or_sock) -> None:
        """A connection (or socket) this try is using: shut when the deadline passes."""
        with self._lock:
            if self._finished:
                return
            self._conns.add(conn_or_sock)
            if self.expired:
                _shut(conn_or_sock)

    def end_attempt(self) -> None:
        """Before the connection goes back to the pool: from here on the watchdog must not touch it."""
        with self._lock:
            self._conns.clear()

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._conns.clear()

    def expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            for conn in self._conns:
                _shut(conn)


def _shut(conn_or_sock) -> None:
    sock = conn_or_sock if isinstance(conn_or_sock, socket.socket) else getattr(conn_or_sock, "sock", None)
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes a blocked recv; the base method, not SSL's
        except OSError:
            pass


class _Watchdog:
    """One daemon thread per process expiring image deadlines (a heap of deadlines, not a timer thread each)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def schedule(self, item: _ImageDeadline) -> None:
        with self._cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._heap, self._pid = [], os.getpid()  # a forked child starts without the parent's thread
                self._thread = threading.Thread(target=self._run, name="ddim-fetch-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (item.end, next(self._seq), item))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                end, _, item = self._heap[0]
                delay = end - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            item.expire()  # outside the heap lock; does nothing for a finished fetch


_WATCHDOG = _Watchdog()


# ---------------------------------------------------------------- connections pinned to checked addresses

_local = threading.local()  # .pin = (host, port, addresses) and .deadline = _ImageDeadline, for this thread's try


def _norm_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _connect_ip(ip: str, port: int, timeout, source_address, socket_options) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for opt in socket_options or ():
            sock.setsockopt(*opt)
        if isinstance(timeout, (int, float)):
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect((ip, port))  # an address, never a name: nothing is resolved here
        return sock
    except BaseException:
        sock.close()
        raise


class _PinnedMixin:
    """Connects to the addresses ``check_http_url`` just approved for this host in this thread, in order."""

    def _new_conn(self) -> socket.socket:
        pin = getattr(_local, "pin", None)
        host = _norm_host(self.host)
        if pin is None or (pin[0], pin[1]) != (host, self.port):
            raise NewConnectionError(self, f"refusing to connect to {self.host}:{self.port}: not the checked host")
        deadline = getattr(_local, "deadline", None)
        if deadline is not None:
            deadline.register(self)
        last: Exception | None = None
        for ip in pin[2]:
            try:
                sock = _connect_ip(ip, self.port, self.timeout, self.source_address, self.socket_options)
                if deadline is not None:  # the TLS handshake can trickle too
                    deadline.register(sock)
            except TimeoutError as e:
                last = ConnectTimeoutError(self, f"Connection to {self.host} ({ip}) timed out. "
                                                 f"(connect timeout={self.timeout})")
                last.__cause__ = e
            except OSError as e:
                last = NewConnectionError(self, f"Failed to establish a new connection to {ip}: {e}")
                last.__cause__ = e
            else:
                sys.audit("http.client.connect", self, self.host, self.port)
                return sock
        raise last if last is not None else NewConnectionError(self, f"{self.host}: no checked address")

    def request(self, *args, **kwargs):
        deadline = getattr(_local, "deadline", None)
        if deadline is not None:  # a reused connection too: the watchdog can cut it
            deadline.register(self)
            if self.sock is not None:  # http.client drops conn.sock for a close-delimited body: keep the socket
                deadline.register(self.sock)
        return super().request(*args, **kwargs)


class _PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class PinnedAdapter(HTTPAdapter):
    """A pooled ``HTTPAdapter`` whose new connections go only to the addresses checked for this try."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PinnedHTTPPool, "https": _PinnedHTTPSPool}


def make_session(policy: FetchPolicy) -> requests.Session:
    """A session for one ``Fetcher``: pinned pooled adapter (as many connections per host as threads), our
    User-Agent, no cookies kept, no automatic retries or redirects (we do both, re-checking every time).

    ``trust_env`` is off, so nothing from the worker's environment changes where a request goes or what it says:
    an ``HTTP(S)_PROXY`` / ``ALL_PROXY`` proxy would make the connection itself, to an address of its choosing,
    past the pinning to the addresses ``check_http_url`` approved (an SSRF hole); ``~/.netrc`` (or ``$NETRC``)
    credentials would be sent as ``Authorization`` to whatever host a manifest names. A CA bundle named by
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` (a company CA) is still honoured: it only adds trust, it sends nothing.
    """
    s = requests.Session()
    s.trust_env = False
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        s.verify = bundle
    adapter = PinnedAdapter(pool_connections=32, pool_maxsize=max(1, policy.concurrency), max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = USER_AGENT
    s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # no state carried between rows
    return s

