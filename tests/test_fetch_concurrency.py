"""The batch fetcher: concurrent downloads over one pooled session, User-Agent, Retry-After and jittered backoff, a
deadline per image, connections pinned to the checked address (no DNS rebinding), worker logging.

Like test_fetch.py, nothing here sends a packet off loopback: the guard fixture (imported from there) fails any
connect or name lookup that is not loopback; public addresses only ever come from injected resolvers.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import ddim_worker.http_connections as fetch_module  # the module that opens the sockets
from ddim_worker.fetch import (
    USER_AGENT,
    Fetcher,
    backoff_seconds,
    ensure_worker_logging,
    fetch_bytes,
    retry_after_seconds,
)
from ddim_worker.url_policy import FetchError, FetchPolicy
from tests.test_fetch import code_of, fixed, loopback_only  # noqa: F401 - loopback_only is an autouse fixture

FAST = FetchPolicy(allow_private_network=True, timeout_s=2, retries=3, backoff_s=0.01)
PUBLIC = "93.184.216.34"  # only ever returned by a fake resolver; the guard stops any real packet to it


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: connections can be reused

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        srv = self.server
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        segs = [p for p in parts.path.split("/") if p]
        with srv.lock:
            srv.paths.append(self.path)
            srv.times.setdefault(parts.path, []).append(time.monotonic())
            count = len(srv.times[parts.path])
        try:
            if segs[:1] == ["img"]:
                self._send(200, f"image {segs[1]}".encode())
            elif segs[:1] == ["sleep"]:
                time.sleep(float(query.get("s", 0.4)))
                self._send(200, f"slept {segs[1]}".encode())
            elif segs[:1] == ["echo"]:
                self._send(200, f"{self.headers.get('Host')}|{self.headers.get('User-Agent')}".encode())
            elif segs[:1] == ["redirect"]:
                self._send(302, headers=[("Location", query["to"])])
            elif segs[:1] == ["missing"]:
                self._send(404)
            elif segs[:1] == ["flaky"]:
                self._send(500) if count == 1 else self._send(200, b"second try")
            elif segs[:1] == ["throttle"]:  # 429 (or ?status=503) with Retry-After on the first GET, then the image
                if count == 1:
                    after = query.get("after", "1")
                    if query.get("date"):
                        when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=float(after))
                        after = email.utils.format_datetime(when, usegmt=True)
                    self._send(int(query.get("status", 429)), headers=[("Retry-After", after)])
                else:
                    self._send(200, b"after the wait")
            elif segs[:1] == ["always429"]:
                self._send(429, headers=[("Retry-After", query.get("after", "3600"))])
            elif segs[:1] == ["down"]:
                self._send(503)
            elif segs[:1] == ["drip"]:  # a byte every 50 ms: never a read timeout, but no end in sight
                self.send_response(200)
                if "unsized" in query:
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", "100000")
                self.end_headers()
                while not srv.stopping.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self._send(500)
        except (BrokenPipeError, ConnectionResetError):
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass  # clients that gave up (deadlines, refused certificates)


def _start(ssl_context=None):
    srv = Server(("127.0.0.1", 0), Handler)
    srv.paths, srv.times, srv.connections, srv.lock = [], {}, 0, threading.Lock()
    srv.stopping = threading.Event()
    scheme = "http"
    if ssl_context is not None:
        srv.socket = ssl_context.wrap_socket(srv.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.port = srv.server_address[1]
    srv.url = f"{scheme}://127.0.0.1:{srv.port}"
    return srv


def _stop(srv):
    srv.stopping.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server():
    srv = _start()
    yield srv
    _stop(srv)


# ---------------------------------------------------------------- many images, one session


def test_fetch_all_in_order_one_failure_per_row(server, tmp_path):
    (tmp_path / "a.png").write_bytes(b"local")
    urls = [server.url + "/img/0", server.url + "/missing/x", "ftp://h/x", "", "a.png", "../etc/passwd",
            server.url + "/img/6", None]
    with Fetcher(FAST, base_uri=str(tmp_path), base_dir=str(tmp_path)) as fetcher:
        results = fetcher.fetch_all(urls)
    assert results[0] == b"image 0" and results[4] == b"local" and results[6] == b"image 6"
    codes = [r.code if isinstance(r, FetchError) else None for r in results]
    assert codes == [None, "not_found", "unsafe_url", "bad_setting", None, "unsafe_url", None, "bad_setting"]


def test_downloads_run_concurrently(server):
    urls = [f"{server.url}/sleep/{i}?s=0.4" for i in range(8)]
    with Fetcher(FetchPolicy(allow_private_network=True, concurrency=8)) as fetcher:
        start = time.monotonic()
        results = fetcher.fetch_all(urls)
        elapsed = time.monotonic() - start
    assert results == [f"slept {i}".encode() for i in range(8)]
    assert elapsed < 1.6, f"8 downloads of 0.4 s took {elapsed:.2f} s: not concurrent"  # serial: 3.2 s


def test_one_session_reuses_connections(server):
    with Fetcher(FetchPolicy(allow_private_network=True, concurrency=4)) as fetcher:
        assert fetcher.fetch_all([f"{server.url}/img/{i}" for i in range(40)]) == [
            f"image {i}".encode() for i in range(40)]
        for i in range(10):  # one at a time, later: still the same pooled connections
            assert fetcher.fetch(f"{server.url}/img/{i}") == f"image {i}".encode()
    assert len(server.paths) == 50
    assert 1 <= server.connections <= 4, f"{server.connections} connections for 50 images with 4 threads"


def test_user_agent_names_the_project_and_version(server):
    host, agent = fetch_bytes(server.url + "/echo", policy=FAST).decode().split("|")
    assert agent == USER_AGENT
    assert agent.startswith("ddim-edit/") and agent.endswith(" (+batch image editing)")
    assert agent.split("/")[1].split(" ")[0] not in ("", "dev")  # the installed package's version


# ---------------------------------------------------------------- Retry-After, backoff, deadline


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logged():
    """Records of the ``ddim_worker`` loggers (the suite runs with -p no:logging, so no caplog)."""
    handler, logger = Records(), logging.getLogger("ddim_worker")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_retry_after_seconds_is_honoured(server, logged):
    start = time.monotonic()
    assert fetch_bytes(server.url + "/throttle/a?after=1", policy=FAST) == b"after the wait"
    times = server.times["/throttle/a"]
    assert len(times) == 2 and times[1] - times[0] >= 1.0  # backoff alone would have waited ~10 ms
    assert time.monotonic() - start < 3
    assert any(r.levelno == logging.WARNING and "asks us to wait 1 s" in r.getMessage() for r in logged)


def test_retry_after_http_date_on_503(server):
    assert fetch_bytes(server.url + "/throttle/b?after=2&date=1&status=503", policy=FAST) == b"after the wait"
    times = server.times["/throttle/b"]
    assert len(times) == 2 and times[1] - times[0] >= 0.9  # whole seconds in an HTTP date: between 1 and 2 s


def test_retry_after_past_the_deadline_fails_at_once(server):
    policy = FetchPolicy(allow_private_network=True, deadline_s=5, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"HTTP 429 \(Retry-After 3600\) \(not retried: .* 5 s deadline") as info:
        fetch_bytes(server.url + "/always429", policy=policy)
    assert info.value.code == "fetch_failed"
    assert time.monotonic() - start < 1
    assert len(server.paths) == 1


def test_retry_after_parsing():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= retry_after_seconds(date, now=now) <= 31
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0


def test_backoff_is_jittered_and_grows():
    policy = FetchPolicy(backoff_s=1.0)
    for k in range(4):
        waits = {backoff_seconds(policy, k) for _ in range(50)}
        assert all(2**k / 2 <= w <= 2**k for w in waits)
        assert len(waits) > 40  # not a fixed schedule: throttled tasks do not retry in lockstep


@pytest.mark.parametrize("query", ["", "?unsized=1"])
def test_deadline_cuts_a_trickling_body(server, query):
    policy = FetchPolicy(allow_private_network=True, timeout_s=5, deadline_s=0.6, retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(FetchError, match="0.6 s deadline") as info:
        fetch_bytes(server.url + "/drip" + query, policy=policy)
    assert info.value.code == "fetch_timeout"
    assert time.monotonic() - start < 1.5  # the read timeout (5 s) never fired: the deadline did
    assert len(server.paths) == 1  # and nothing is retried past the deadline


def test_deadline_spans_retries(server):
    policy = FetchPolicy(allow_private_network=True, retries=20, backoff_s=0.2, deadline_s=0.8)
    start = time.monotonic()
    with pytest.raises(FetchError, match="deadline") as info:
        fetch_bytes(server.url + "/down", policy=policy)
    assert info.value.code in ("fetch_failed", "fetch_timeout")
    assert time.monotonic() - start < 1.2
    assert len(server.paths) < 6


# ---------------------------------------------------------------- connect to the checked address only


def test_connects_to_the_checked_address_not_a_rebound_one(server, monkeypatch):
    """The resolver answers public for the check and loopback afterwards (DNS rebinding), and so does the system
    resolver: the fetch must connect to the checked public address (refused here), never to loopback."""
    answers = []

    def rebinding(host, port):
        answers.append(host)
        return [PUBLIC] if len(answers) == 1 else ["127.0.0.1"]

    guard_getaddrinfo, guard_connect = fetch_module.socket.getaddrinfo, fetch_module.socket.socket.connect

    def system_dns(host, *args, **kwargs):  # what requests' own lookup would get after the rebinding
        return guard_getaddrinfo("127.0.0.1" if host == "rebind.test" else host, *args, **kwargs)

    attempted = []

    def connect(self, address):
        attempted.append(address[0])
        if address[0] == PUBLIC:
            raise ConnectionRefusedError("test: the checked public address does not answer")
        return guard_connect(self, address)

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", system_dns)
    monkeypatch.setattr(fetch_module.socket.socket, "connect", connect)
    url = f"http://rebind.test:{server.port}/img/1"

    # Control: without pinning, a plain requests.get follows the rebound DNS to the loopback server.
    assert requests.get(url, timeout=2).content == b"image 1"
    assert attempted == ["127.0.0.1"] and len(server.paths) == 1
    attempted.clear()
    server.paths.clear()

    policy = FetchPolicy(timeout_s=1, retries=0)  # private addresses not allowed (the default)
    with pytest.raises(FetchError, match="93.184.216.34") as info:
        fetch_bytes(url, policy=policy, resolve=rebinding)
    assert info.value.code == "fetch_failed"
    assert attempted == [PUBLIC] and server.paths == []

    # With a retry, the retry re-checks: the resolver now says loopback, refused before any connect.
    answers.clear()
    attempted.clear()
    policy = FetchPolicy(timeout_s=1, retries=1, backoff_s=0.01)
    assert code_of(fetch_bytes, url, policy=policy, resolve=rebinding) == "unsafe_url"
    assert answers == ["rebind.test", "rebind.test"] and attempted == [PUBLIC] and server.paths == []


def test_pinned_connection_keeps_the_host_name(server):
    """A name resolved only by the injected resolver: the connection goes to its address (the guard would fail a
    system lookup of "pinned.test") and the request still says Host: pinned.test."""
    body = fetch_bytes(f"http://pinned.test:{server.port}/echo", policy=FAST, resolve=fixed("127.0.0.1"))
    assert body.decode().split("|")[0] == f"pinned.test:{server.port}"


def test_every_try_and_hop_is_checked(server):
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"]

    assert fetch_bytes(f"http://flaky.test:{server.port}/flaky/x", policy=FAST, resolve=resolver) == b"second try"
    assert calls == ["flaky.test", "flaky.test"]  # the retry re-resolved and re-checked
    calls.clear()
    hop = urllib.parse.quote(f"http://second.test:{server.port}/img/2", safe="")
    assert fetch_bytes(f"http://first.test:{server.port}/redirect?to={hop}", policy=FAST, resolve=resolver) == (
        b"image 2")
    assert calls == ["first.test", "second.test"]  # the hop was checked, and its connection pinned to its answer


# ---------------------------------------------------------------- https: SNI and certificate for the host name


@pytest.fixture
def tls(tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject, issuer, public_key, signing_key, *, ca, names=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                                            critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ddim-edit test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.test")]), ca_name, key.public_key(), ca_key,
                ca=False, names=["img.test"])
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    srv = _start(context)
    srv.sni = names
    srv.ca = str(tmp_path / "ca.pem")
    yield srv
    _stop(srv)


def test_https_pinned_keeps_sni_and_certificate_checks(tls, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca)
    loopback = fixed("127.0.0.1")
    body = fetch_bytes(f"https://img.test:{tls.port}/echo", policy=FAST, resolve=loopback)
    assert body.decode().split("|")[0] == f"img.test:{tls.port}"
    assert tls.sni == ["img.test"]  # SNI names the host, not the pinned address

    # The certificate is checked against the name too: other.test pinned to the same address is refused, once.
    tls.sni.clear()
    with pytest.raises(FetchError, match="certificate|hostname|match") as info:
        fetch_bytes(f"https://other.test:{tls.port}/echo", policy=FAST, resolve=loopback)
    assert info.value.code == "fetch_failed"
    assert tls.sni == ["other.test"] and len(tls.paths) == 1  # no request sent, and not retried


# ---------------------------------------------------------------- worker logging


def test_ensure_worker_logging_once_per_process():
    code = ("import logging\n"
            "from ddim_worker.fetch import ensure_worker_logging\n"
            "ensure_worker_logging(); ensure_worker_logging()\n"
            "logging.getLogger('ddim_worker.fetch').warning('throttled by example.test')\n"
            "logging.getLogger('ddim_worker.fetch').info('retry 1')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("WARNING ddim_worker.fetch: throttled by example.test") == 1
    assert "retry 1" not in done.stderr


def test_ensure_worker_logging_writes_to_the_current_stderr(capsys):
    ensure_worker_logging()
    ensure_worker_logging()
    logger = logging.getLogger("ddim_worker")
    assert sum(getattr(h, "_ddim_edit_worker_handler", False) for h in logger.handlers) == 1
    logging.getLogger("ddim_worker.fetch").warning("reaches stderr")
    assert "reaches stderr" in capsys.readouterr().err
