"""URL policy and fetching. Nothing here may send a packet off loopback: non-loopback addresses are only ever given to
the pure policy function through an injected resolver, and a guard fixture fails any socket connect or name lookup
that is not loopback, even if the code under test is wrong."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest

from ddim_worker.fetch import fetch_bytes, redirect_target
from ddim_worker.url_policy import (
    FetchError,
    FetchPolicy,
    check_http_url,
    check_object_url,
    classify,
    is_public_address,
    object_location,
    resolve_local_path,
)

FAST = FetchPolicy(allow_private_network=True, timeout_s=0.5, retries=3, backoff_s=0.01)
PRIVATE = ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "fe80::1", "::1", "0.0.0.0", "224.0.0.1",
           "100.64.0.1", "::ffff:127.0.0.1", "127.0.0.1", "::", "fc00::1", "255.255.255.255", "2002:7f00:1::",
           "64:ff9b::a9fe:a9fe"]


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail (before any packet) every connect or DNS lookup that is not loopback; no env proxies either."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise AssertionError(f"test tried to connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host if isinstance(host, str) else host.decode()):
            raise AssertionError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def fixed(*addresses):
    return lambda host, port: list(addresses)


def no_dns(host, port):
    raise AssertionError(f"resolver called for literal {host!r}")


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(FetchError) as info:
        fn(*args, **kwargs)
    return info.value.code


# ---------------------------------------------------------------- policy, pure


@pytest.mark.parametrize("ip", PRIVATE)
def test_non_public_addresses_refused(ip):
    assert not is_public_address(ip)
    assert code_of(check_http_url, "http://img.test/a.png", FetchPolicy(), resolve=fixed(ip)) == "unsafe_url"
    assert check_http_url("http://img.test/a.png", FetchPolicy(allow_private_network=True), resolve=fixed(ip)) == [ip]


def test_public_address_allowed_without_connecting():
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1::1")
    assert check_http_url("https://img.test/a.png", FetchPolicy(), resolve=fixed("93.184.216.34")) == ["93.184.216.34"]


def test_any_private_address_in_the_answer_refuses():
    mixed = fixed("93.184.216.34", "10.1.2.3")
    assert code_of(check_http_url, "http://img.test/", FetchPolicy(), mixed) == "unsafe_url"


@pytest.mark.parametrize("url", ["http://127.1.2.3/x", "http://2130706433/x", "http://0x7f000001/x", "http://127.1/x",
                                 "http://0177.0.0.1/x", "http://[::1]:80/x", "http://[::ffff:169.254.169.254]/",
                                 "http://0/x", "http://127.0.0.1\\@evil.test/x"])
def test_literal_ip_forms_refused_without_dns(url):
    assert code_of(check_http_url, url, FetchPolicy(), resolve=no_dns) == "unsafe_url"


@pytest.mark.parametrize("url", ["ftp://x/y", "file:///etc/passwd", "s3://b/k", "http://", "img.png",
                                 "http://x:99999/"])
def test_check_http_url_rejects_non_http(url):
    policy = FetchPolicy(allow_private_network=True)
    assert code_of(check_http_url, url, policy, resolve=fixed("1.1.1.1")) == "unsafe_url"


def test_resolve_failure_is_fetch_failed():
    def fail(host, port):
        raise socket.gaierror("no such host")

    assert code_of(check_http_url, "http://nowhere.test/", FetchPolicy(), resolve=fail) == "fetch_failed"


def test_redirect_target_is_rechecked():
    resolver = {"public.test": ["93.184.216.34"], "internal.test": ["10.0.0.5"]}
    resolve = lambda host, port: resolver[host]  # noqa: E731
    assert redirect_target("http://public.test/a", "/b.png", FetchPolicy(), resolve) == "http://public.test/b.png"
    for location in ("http://127.0.0.1/x", "http://internal.test/", "file:///etc/passwd", "//10.0.0.1/x"):
        assert code_of(redirect_target, "http://public.test/a", location, FetchPolicy(), resolve) == "unsafe_url"


@pytest.mark.parametrize(
    "url,kind",
    [("s3://b/k", "fsspec"), ("memory://x", "fsspec"), ("gs://b/k", "fsspec"), ("http://h/x", "http"),
     ("HTTPS://h/x", "http"), ("a/b.png", "local"), ("/abs/b.png", "local"), ("file:///x.png", "local"),
     ("s3a://b/k", "fsspec"), ("gcs://b/k", "fsspec"), ("az://c/k", "fsspec"), ("abfs://c/k", "fsspec"),
     ("abfss://c@acct.dfs.core.windows.net/k", "fsspec"), ("hf://datasets/o/n/x.png", "fsspec"),
     ("arrow_hdfs://h/x", "local")],  # not a URL scheme (underscore): a plain path, local rules apply
)
def test_classify(url, kind):
    assert classify(url) == kind


@pytest.mark.parametrize("url", ["gopher://x", "javascript:alert(1)", "data:image/png;base64,AA", "ftp://h/x",
                                 "local:///etc/passwd", "simplecache::file:///etc/passwd", "zip://a::s3://b/c.zip",
                                 "sftp://h/x", "memory://a::file:///etc/passwd", "webdav://h/x", "smb://h/x",
                                 "github://o:r@main/x", "reference://x", "dask://x", "dir://x",
                                 "webhdfs://h/x", "s3:bucket/k"])
def test_classify_refuses(url):
    """fsspec schemes are allowed by list: anything not on it (even ones fsspec knows) is unsafe_url."""
    assert code_of(classify, url) == "unsafe_url"


# ---------------------------------------------------------------- local files


@pytest.fixture
def folder(tmp_path):
    base = tmp_path / "manifests"
    (base / "img").mkdir(parents=True)
    (base / "img" / "a.png").write_bytes(b"inside")
    (tmp_path / "outside.png").write_bytes(b"outside")
    os.symlink(tmp_path / "outside.png", base / "img" / "link.png")
    return base


def test_local_inside_allowed(folder):
    assert fetch_bytes("img/a.png", base_dir=str(folder)) == b"inside"
    assert fetch_bytes(f"file://{folder}/img/a.png", base_dir=str(folder)) == b"inside"
    assert fetch_bytes(str(folder / "img" / "a.png"), base_dir=str(folder)) == b"inside"
    assert fetch_bytes("img/a.png", base_uri=str(folder)) == b"inside"
    assert code_of(fetch_bytes, "img/missing.png", base_dir=str(folder)) == "not_found"


@pytest.mark.parametrize("url", ["../outside.png", "img/../../outside.png", "file:///etc/passwd", "/etc/passwd",
                                 "img/link.png"])
def test_local_outside_refused(folder, url):
    assert code_of(resolve_local_path, url, str(folder), FetchPolicy()) == "unsafe_url"
    assert code_of(fetch_bytes, url, base_dir=str(folder)) == "unsafe_url"


def test_local_refused_message_and_allow_flag(folder):
    with pytest.raises(FetchError, match="outside the manifest's folder .*--allow-local-files"):
        resolve_local_path("file:///etc/passwd", str(folder), FetchPolicy())
    allow = FetchPolicy(allow_local_files=True)
    assert fetch_bytes("../outside.png", base_dir=str(folder), policy=allow) == b"outside"
    assert fetch_bytes("img/link.png", base_dir=str(folder), policy=allow) == b"outside"


def test_local_path_refused_when_manifest_not_local(folder):
    assert code_of(resolve_local_path, str(folder / "img" / "a.png"), None, FetchPolicy()) == "unsafe_url"
    assert resolve_local_path(str(folder / "img" / "a.png"), None, FetchPolicy(allow_local_files=True))


def test_local_too_large(folder):
    assert code_of(fetch_bytes, "img/a.png", base_dir=str(folder), policy=FetchPolicy(max_bytes=3)) == "too_large"


def test_a_fifo_or_device_is_a_row_error_not_a_hang(folder):
    """Opening a FIFO for reading blocks until a writer comes, and a device never ends: each is refused before a
    read, as its own row's error, and the rows beside it are read."""
    from ddim_worker.fetch import Fetcher

    fifo = folder / "img" / "pipe.png"
    os.mkfifo(fifo)
    box: dict = {}
    allow = FetchPolicy(allow_local_files=True)

    def fetch() -> None:
        with Fetcher(allow, base_dir=str(folder)) as fetcher:
            box["results"] = fetcher.fetch_all(["img/a.png", "img/pipe.png", "/dev/zero", "img"])

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(30)
    try:
        assert not thread.is_alive(), "fetching a FIFO hung"
    finally:
        if thread.is_alive():  # release the reader stuck on the FIFO
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    ok, pipe, device, directory = box["results"]
    assert ok == b"inside"
    assert isinstance(pipe, FetchError) and pipe.code == "unsafe_url" and "a FIFO" in pipe.message
    assert isinstance(device, FetchError) and device.code == "unsafe_url" and "character device" in device.message
    assert isinstance(directory, FetchError) and directory.code == "unsafe_url" and "a folder" in directory.message


# ---------------------------------------------------------------- http on 127.0.0.1


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.paths.append(self.path)
            count = srv.paths.count(self.path)
        if self.path == "/ok":
            self._send(200, b"\x89PNG bytes")
        elif self.path == "/empty":
            self._send(200, b"")
        elif self.path in ("/missing", "/gone"):
            self._send(404 if self.path == "/missing" else 410)
        elif self.path == "/forbidden":
            self._send(403)
        elif self.path == "/flaky":
            self._send(500) if count <= 2 else self._send(200, b"third time")
        elif self.path == "/down":
            self._send(503)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, b"late")
        elif self.path == "/stall":  # headers and a little body, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            time.sleep(1.5)
        elif self.path == "/big":
            self._send(200, b"x" * 5000)
        elif self.path == "/big-unsized":  # HTTP/1.0 body delimited by close: only the streaming limit can stop it
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif self.path.startswith("/tagged/"):  # /tagged/<value>[/<value>]: one X-Robots-Tag header per value
            values = [urllib.parse.unquote(v) for v in self.path.split("/")[2:]]
            self._send(200, b"\x89PNG tagged", headers=[("X-Robots-Tag", v) for v in values])
        elif self.path == "/redirect":
            self._send(302, headers=[("Location", "/ok")])
        elif self.path == "/loop":
            self._send(302, headers=[("Location", "/loop")])
        else:
            self._send(500)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # broken pipes from requests the client gave up on (timeouts, too_large)


@pytest.fixture
def server():
    srv = QuietServer(("127.0.0.1", 0), Handler)
    srv.paths, srv.lock = [], threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_http_ok_and_empty(server):
    assert fetch_bytes(server.url + "/ok", policy=FAST) == b"\x89PNG bytes"
    assert fetch_bytes(server.url + "/empty", policy=FAST) == b""


def test_http_not_found_and_client_errors(server):
    assert code_of(fetch_bytes, server.url + "/missing", policy=FAST) == "not_found"
    assert code_of(fetch_bytes, server.url + "/gone", policy=FAST) == "not_found"
    with pytest.raises(FetchError, match="403") as info:
        fetch_bytes(server.url + "/forbidden", policy=FAST)
    assert info.value.code == "fetch_failed"
    assert server.paths == ["/missing", "/gone", "/forbidden"]  # none of these is retried


@pytest.mark.parametrize("tags, refused", [
    (["noai"], "noai"), (["noimageai, nofollow"], "noimageai"), (["NoIndex"], "noindex"),
    (["nofollow", "noimageindex"], "noimageindex"), (["ddim-edit: noai"], "noai"), (["*: noimageai"], "noimageai"),
    (["googlebot: noindex"], None), (["nofollow, noarchive"], None), ([], None)])
def test_x_robots_tag_opt_outs_are_honoured(server, tags, refused):
    url = server.url + "/tagged/" + "/".join(urllib.parse.quote(t, safe="") for t in tags)
    if refused is None:
        assert fetch_bytes(url, policy=FAST) == b"\x89PNG tagged"
        return
    with pytest.raises(FetchError, match=f"opts this image out of AI use \\(X-Robots-Tag: {refused}\\)") as info:
        fetch_bytes(url, policy=FAST)
    assert info.value.code == "opted_out" and server.paths.count(url.removeprefix(server.url)) == 1  # not retried
    ignoring = dataclasses.replace(FAST, disallowed_directives=())  # --no-respect-opt-outs
    assert fetch_bytes(url, policy=ignoring) == b"\x89PNG tagged"


def test_http_retries_5xx(server):
    assert fetch_bytes(server.url + "/flaky", policy=FAST) == b"third time"
    assert server.paths == ["/flaky"] * 3
    assert code_of(fetch_bytes, server.url + "/down", policy=FAST) == "fetch_failed"
    assert server.paths.count("/down") == FAST.retries + 1


def test_http_timeout(server):
    policy = FetchPolicy(allow_private_network=True, timeout_s=0.3, retries=1, backoff_s=0.01)
    start = time.monotonic()
    assert code_of(fetch_bytes, server.url + "/slow", policy=policy) == "fetch_timeout"
    assert time.monotonic() - start < 1.4
    assert server.paths == ["/slow", "/slow"]


def test_http_timeout_mid_body(server):
    policy = FetchPolicy(allow_private_network=True, timeout_s=0.3, retries=0)
    assert code_of(fetch_bytes, server.url + "/stall", policy=policy) == "fetch_timeout"


def test_http_too_large(server):
    small = FetchPolicy(allow_private_network=True, max_bytes=1000, retries=0)
    assert code_of(fetch_bytes, server.url + "/big", policy=small) == "too_large"
    assert code_of(fetch_bytes, server.url + "/big-unsized", policy=small) == "too_large"


def test_http_redirects(server):
    assert fetch_bytes(server.url + "/redirect", policy=FAST) == b"\x89PNG bytes"
    assert server.paths == ["/redirect", "/ok"]
    with pytest.raises(FetchError, match="redirects") as info:
        fetch_bytes(server.url + "/loop", policy=FAST)
    assert info.value.code == "fetch_failed"
    assert server.paths.count("/loop") == FAST.max_redirects + 1


def test_fetch_checks_each_redirect_hop_before_connecting(server, monkeypatch):
    import ddim_worker.fetch as fetch_module

    checked = []

    def spy(url, policy, resolve=None):  # stands in for a resolver that calls the second hop private
        checked.append(url)
        if url.endswith("/ok"):
            raise FetchError("unsafe_url", f"{url} is private")
        return ["127.0.0.1"]

    monkeypatch.setattr(fetch_module, "check_http_url", spy)
    assert code_of(fetch_bytes, server.url + "/redirect", policy=FAST) == "unsafe_url"
    assert checked == [server.url + "/redirect", server.url + "/ok"]
    assert server.paths == ["/redirect"]  # the refused hop was never requested


def test_http_loopback_refused_before_connecting(server):
    port = server.server_address[1]
    for url in (f"http://127.0.0.1:{port}/ok", f"http://127.1.2.3:{port}/ok", f"http://2130706433:{port}/ok"):
        assert code_of(fetch_bytes, url) == "unsafe_url"
    assert server.paths == []


class _ConnectionRecorder:
    """A TCP listener on loopback that records every connection and closes it: a stand-in proxy."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.connections.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_environment_proxies_and_netrc_are_ignored(http_server, tmp_path, monkeypatch):
    """A proxy would connect past the pinned, checked address; a netrc would hand credentials to any host a manifest
    names: neither is taken from the environment. The image comes from the server itself, without Authorization."""
    (http_server.root / "proxied.png").write_bytes(b"\x89PNG straight from the server")
    proxy = _ConnectionRecorder()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\ndefault login anyone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text(netrc.read_text())
    (tmp_path / ".netrc").chmod(0o600)
    image = http_server.url("proxied.png")
    try:
        http_server.reset()
        assert fetch_bytes(image, policy=FAST) == b"\x89PNG straight from the server"  # a netrc alone
        assert http_server.requests.snapshot() == ["/proxied.png"]
        assert not any(k.lower() == "authorization" for h in http_server.requests.headers for k in h)
        for var in ("NO_PROXY", "no_proxy"):  # the test environment exempts loopback from proxies: undo that
            monkeypatch.delenv(var, raising=False)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(var, proxy.url)
        http_server.reset()
        assert fetch_bytes(image, policy=FAST) == b"\x89PNG straight from the server"  # and proxies too
        assert http_server.requests.snapshot() == ["/proxied.png"]
        assert not any(k.lower() == "authorization" for h in http_server.requests.headers for k in h)
    finally:
        proxy.close()
    assert proxy.connections == []


def test_connection_refused_is_retried_then_fetch_failed():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = FetchPolicy(allow_private_network=True, timeout_s=0.5, retries=2, backoff_s=0.01)
    assert code_of(fetch_bytes, f"http://127.0.0.1:{port}/x", policy=policy) == "fetch_failed"


def test_relative_path_against_http_base_uri(server):
    assert fetch_bytes("ok", base_uri=server.url, policy=FAST) == b"\x89PNG bytes"
    assert code_of(fetch_bytes, "../ok", base_uri=server.url + "/sub", policy=FAST) == "unsafe_url"


# ---------------------------------------------------------------- fsspec (memory://)


@pytest.fixture
def mem():
    root = f"memory://ddim-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_fsspec_memory(mem):
    with fsspec.open(f"{mem}/manifests/img/a.png", "wb") as f:
        f.write(b"from memory")
    with fsspec.open(f"{mem}/empty.png", "wb") as f:
        pass
    base = f"{mem}/manifests"
    assert fetch_bytes(f"{mem}/manifests/img/a.png", base_uri=base) == b"from memory"
    assert fetch_bytes(f"{mem}/empty.png", base_uri=base) == b""  # same bucket, outside the folder: allowed
    assert code_of(fetch_bytes, f"{mem}/nope.png", base_uri=base) == "not_found"
    assert fetch_bytes("img/a.png", base_uri=base) == b"from memory"
    assert fetch_bytes("./img/../img/a.png", base_uri=f"{mem}/manifests/") == b"from memory"
    assert fetch_bytes("img/a.png", base_uri=base.replace("memory://", "memory:///")) == b"from memory"
    assert code_of(fetch_bytes, "../empty.png", base_uri=base) == "unsafe_url"
    assert code_of(fetch_bytes, "/etc/passwd", base_uri=base) == "unsafe_url"
    big = FetchPolicy(max_bytes=4)
    assert code_of(fetch_bytes, f"{mem}/manifests/img/a.png", base_uri=base, policy=big) == "too_large"


# ---------------------------------------------------------------- object stores: the manifest's bucket only


def test_object_url_outside_the_manifests_bucket_refused(mem):
    with fsspec.open(f"{mem}/secret.png", "wb") as f:
        f.write(b"secret")
    other_manifest = "memory://some-other-bucket/manifests"
    with pytest.raises(FetchError, match="outside the manifest's bucket memory://some-other-bucket/; "
                                         "pass --allow-prefix memory://ddim-test-") as info:
        fetch_bytes(f"{mem}/secret.png", base_uri=other_manifest)
    assert info.value.code == "unsafe_url"
    allowed = FetchPolicy(allowed_prefixes=(f"{mem}/",))
    assert fetch_bytes(f"{mem}/secret.png", base_uri=other_manifest, policy=allowed) == b"secret"


def test_object_url_from_a_local_manifest_needs_a_prefix(folder, mem):
    with fsspec.open(f"{mem}/img/a.png", "wb") as f:
        f.write(b"remote")
    with pytest.raises(FetchError, match="in an object store but the manifest is not; pass --allow-prefix") as info:
        fetch_bytes(f"{mem}/img/a.png", base_dir=str(folder), base_uri=str(folder))
    assert info.value.code == "unsafe_url"
    assert code_of(fetch_bytes, f"{mem}/img/a.png") == "unsafe_url"  # no manifest at all: no bucket of its own
    allowed = FetchPolicy(allowed_prefixes=(f"{mem}/img",))
    assert fetch_bytes(f"{mem}/img/a.png", base_dir=str(folder), base_uri=str(folder), policy=allowed) == b"remote"
    assert fetch_bytes("img/a.png", base_dir=str(folder), base_uri=str(folder), policy=allowed) == b"inside"


@pytest.mark.parametrize(
    "url,base,prefixes,ok",
    [
        ("s3://jobs/in/a.png", "s3://jobs/manifests", (), True),
        ("s3a://jobs/in/a.png", "s3://jobs/manifests", (), True),  # s3a is s3
        ("s3://other/a.png", "s3://jobs/manifests", (), False),
        ("gs://jobs/a.png", "s3://jobs/manifests", (), False),  # same name, another store
        ("s3://jobs/a.png", "/data/manifests", (), False),
        ("s3://jobs/a.png", "https://example.test/m", (), False),
        ("s3://jobs/a.png", None, (), False),
        ("s3://other/img/a.png", "s3://jobs/m", ("s3://other/img",), True),
        ("s3://other/img/a.png", "s3://jobs/m", ("s3://other/img/",), True),
        ("s3://other/img2/a.png", "s3://jobs/m", ("s3://other/img",), False),  # whole segments only
        ("s3://other/img/../secret/a.png", "s3://jobs/m", ("s3://other/img",), False),
        ("s3://other/img/%2e%2e/secret/a.png", "s3://jobs/m", ("s3://other/img",), False),
        ("s3://jobs/../other/a.png", "s3://jobs/m", (), False),
        ("s3://other/a.png", "s3://jobs/m", ("s3://other",), True),
        ("gcs://other/a.png", "s3://jobs/m", ("gs://other/",), True),
        ("s3://jobs-evil/a.png", "s3://jobs/m", ("s3://jobs",), False),
        ("s3:///a.png", "s3://jobs/m", (), False),
        ("abfs://c@mine.dfs.core.windows.net/x.png", "abfs://c@mine.dfs.core.windows.net/m", (), True),
        ("abfs://c@theirs.dfs.core.windows.net/x.png", "abfs://c@mine.dfs.core.windows.net/m", (), False),
        ("hf://datasets/me/data@v2/img/a.png", "hf://datasets/me/data/m", (), True),
        ("hf://datasets/me/other/img/a.png", "hf://datasets/me/data/m", (), False),
        ("hf://datasets/me/other/img/a.png", "/local", ("hf://datasets/me/other",), True),
    ],
)
def test_check_object_url(url, base, prefixes, ok):
    policy = FetchPolicy(allowed_prefixes=prefixes)
    if ok:
        check_object_url(url, base, policy)
    else:
        assert code_of(check_object_url, url, base, policy) == "unsafe_url"


@pytest.mark.parametrize("prefix", ["https://example.test/", "file:///data", "/data/images", "ftp://h/", "s3://",
                                    "s3://b/../c", "memory://a::s3://b"])
def test_allowed_prefixes_must_be_object_store_prefixes(prefix):
    with pytest.raises(ValueError, match="--allow-prefix"):
        FetchPolicy(allowed_prefixes=(prefix,))


def test_allowed_prefixes_normalised_to_a_tuple():
    assert FetchPolicy(allowed_prefixes=["s3://a/", "gs://b"]).allowed_prefixes == ("s3://a/", "gs://b")
    assert FetchPolicy(allowed_prefixes="s3://a/").allowed_prefixes == ("s3://a/",)
    assert object_location("hf://datasets/o/n@main/x/y.png").container == "datasets/o/n"
    assert object_location("memory:///b/k").container == "b"


def test_fsspec_transient_errors_retried(monkeypatch):
    calls, real_open = [], fsspec.open

    class Flaky:
        def __init__(self, exc):
            self.exc = exc

        def __call__(self, url, mode, **kw):
            calls.append(url)
            if len(calls) <= 2:
                raise self.exc
            return real_open("memory://ddim-test-flaky/ok.png", mode)

    with fsspec.open("memory://ddim-test-flaky/ok.png", "wb") as f:
        f.write(b"ok")
    policy = FetchPolicy(retries=3, backoff_s=0.01, allowed_prefixes=("s3://bucket/",))
    throttled = OSError("SlowDown")
    throttled.__cause__ = type("ClientError", (Exception,), {"response": {"Error": {"Code": "SlowDown"}}})()
    for exc in (ConnectionResetError("reset"), throttled):
        calls.clear()
        monkeypatch.setattr(fsspec, "open", Flaky(exc))
        assert fetch_bytes("s3://bucket/ok.png", policy=policy) == b"ok"
        assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(fsspec, "open", Flaky(PermissionError("Access Denied")))
    with pytest.raises(FetchError, match="PermissionError") as info:
        fetch_bytes("s3://bucket/ok.png", policy=policy)
    assert info.value.code == "fetch_failed" and len(calls) == 1
    fsspec.filesystem("memory").rm("memory://ddim-test-flaky", recursive=True)
