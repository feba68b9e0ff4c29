"""Real services for the tests, as plain modules usable without pytest.

- ``env``: the process environment the services and Ray workers need (``prepare_environment``).
- ``ray_local``: one local Ray instance (``local_ray``).
- ``s3_server``: an S3 server on loopback, SeaweedFS or moto's server (``start_s3_server`` / ``running_s3_server``).
- ``http_server``: a threaded HTTP server on loopback (``start_http_server`` / ``running_http_server``).

``tests/conftest.py`` wraps each in a session fixture. Everything listens on 127.0.0.1 only.
"""

from tests.support.env import REPO_ROOT, prepare_environment
from tests.support.http_server import HttpServer, RequestLog, running_http_server, start_http_server
from tests.support.ray_local import RAY_INIT_KWARGS, local_ray
from tests.support.s3_server import NoS3Server, S3Server, running_s3_server, start_s3_server

__all__ = [
    "REPO_ROOT",
    "RAY_INIT_KWARGS",
    "HttpServer",
    "NoS3Server",
    "RequestLog",
    "S3Server",
    "local_ray",
    "prepare_environment",
    "running_http_server",
    "running_s3_server",
    "start_http_server",
    "start_s3_server",
]
