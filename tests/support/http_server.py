"""A real threaded HTTP server on 127.0.0.1 (random port) serving the files in a folder, plus a few test routes.

``start_http_server(root)`` returns a running ``HttpServer``; ``server.stop()`` stops it. ``running_http_server``
does both as a context manager.

Routes besides plain files: ``/status/<code>`` answers that code; ``/flaky/<key>/<name>`` answers 500 on the first
GET for each key, then serves ``<name>`` from root; ``/hang`` waits 30 s (released at stop) before answering;
``/redirect?to=<url>`` answers 302 to ``to``; ``/robots/<name>?tag=<value>`` serves ``<name>`` with an ``X-Robots-Tag: <value>`` header per
tag. Every request path (with query) is appended to ``requests`` (its headers to ``requests.headers``).
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RequestLog(list):
    """Paths (with query string) of the requests an ``HttpServer`` received, in order; thread-safe."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.headers: list[dict[str, str]] = []  # each request's headers, in the same order

    def append(self, item: str, headers: dict[str, str] | None = None) -> None:  # type: ignore[override]
        with self._lock:
            super().append(item)
            self.headers.append(dict(headers or {}))

    def clear(self) -> None:
        with self._lock:
            super().clear()
            self.headers.clear()

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self)


@dataclass
class HttpServer:
    """A threaded HTTP server on loopback serving ``root``; see the module docstring for its routes."""

    port: int
    root: Path
    requests: RequestLog
    flaky_seen: set[str]
    release: threading.Event  # set at stop: /hang handlers return at once
    _httpd: http.server.ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def count(self, path: str) -> int:
        """How many requests asked for ``path`` (query string ignored if ``path`` has none)."""
        want = path if path.startswith("/") else "/" + path
        snap = self.requests.snapshot()
        if "?" in want:
            return snap.count(want)
        return sum(1 for p in snap if p.split("?", 1)[0] == want)

    def reset(self) -> None:
        """Forget recorded requests and which flaky keys already failed."""
        self.requests.clear()
        self.flaky_seen.clear()

    def stop(self) -> None:
        """Release hanging handlers, stop serving, close the socket (a second call does nothing)."""
        self.release.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _make_handler(state: dict[str, Any]) -> type[http.server.SimpleHTTPRequestHandler]:
    root: Path = state["root"]
    requests: RequestLog = state["requests"]
    flaky_seen: set[str] = state["flaky_seen"]
    flaky_lock = threading.Lock()
    release: threading.Event = state["release"]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep pytest output clean
            pass

        def _plain(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            requests.append(self.path, dict(self.headers.items()))
            parsed = urllib.parse.urlsplit(self.path)
            parts = [p for p in parsed.path.split("/") if p]
            try:
                if parts[:1] == ["status"] and len(parts) == 2 and parts[1].isdigit():
                    code = int(parts[1])
                    self._plain(code, f"status {code}\n".encode())
                    return
                if parts[:1] == ["hang"]:
                    release.wait(30)
                    self._plain(200, b"finally\n")
                    return
                if parts[:1] == ["redirect"]:
                    to = urllib.parse.parse_qs(parsed.query).get("to", [""])[0]
                    if not to:
                        self._plain(400, b"redirect needs ?to=<url>\n")
                        return
                    self._plain(302, b"", {"Location": to})
                    return
                if parts[:1] == ["robots"] and len(parts) >= 2:
                    # /robots/<name>?tag=noai&tag=...: the file, with one X-Robots-Tag header per tag
                    tags = urllib.parse.parse_qs(parsed.query).get("tag", [])
                    body = (root / "/".join(parts[1:])).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    for tag in tags:
                        self.send_header("X-Robots-Tag", tag)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                if parts[:1] == ["flaky"] and len(parts) >= 3:
                    key = parts[1]
                    if self.command == "GET":
                        with flaky_lock:
                            first = key not in flaky_seen
                            flaky_seen.add(key)
                        if first:
                            self._plain(500, f"flaky {key}: try again\n".encode())
                            return
                    self.path = "/" + "/".join(parts[2:])
                if self.command == "HEAD":
                    super().do_HEAD()
                else:
                    super().do_GET()
            except (BrokenPipeError, ConnectionResetError):  # client gave up (timeouts in tests): fine
                pass

        def do_GET(self) -> None:  # noqa: N802
            self._route()

        def do_HEAD(self) -> None:  # noqa: N802
            self._route()

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must not keep the interpreter alive
    block_on_close = False  # nor block server_close()
    allow_reuse_address = True


def start_http_server(root: Path) -> HttpServer:
    """Serve ``root`` on 127.0.0.1 (random port) from a daemon thread; call ``stop()`` on the result when done."""
    state: dict[str, Any] = {
        "root": Path(root),
        "requests": RequestLog(),
        "flaky_seen": set(),
        "release": threading.Event(),
    }
    httpd = _Server(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return HttpServer(
        port=httpd.server_address[1],
        root=Path(root),
        requests=state["requests"],
        flaky_seen=state["flaky_seen"],
        release=state["release"],
        _httpd=httpd,
        _thread=thread,
    )


@contextlib.contextmanager
def running_http_server(root: Path) -> Iterator[HttpServer]:
    """``start_http_server(root)`` for the ``with`` block; stopped on exit."""
    server = start_http_server(root)
    try:
        yield server
    finally:
        server.stop()
