"""Fixtures for every layer, and the layer markers.

Tests live in ``unit/`` (in-process, seconds), ``multirank/`` (real gloo ranks in separate
processes) and ``system/`` (torchrun, SLURM, sshfs, S3 faults, the demo and the CLI as
subprocesses); each test is marked with its folder's name, so ``./tests/run.sh -m unit``
runs one layer. ``support/`` holds what they share.
"""

import logging
import os
import socket
import subprocess
import time
import uuid

import pytest

from tests.support import REPO, free_port
from tests.support.s3 import S3_SERVERS, s3_bucket

logging.getLogger("distckpt").setLevel(logging.INFO)
logging.getLogger("werkzeug").setLevel(logging.WARNING)

LAYERS = {"unit": "unit", "multirank": "multirank", "system": "system", "integrations": "integration"}


def pytest_collection_modifyitems(items):
    for item in items:
        layer = os.path.basename(os.path.dirname(str(item.path)))
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, LAYERS[layer]))


@pytest.fixture
def root(tmp_path):
    """A checkpoint root directory as a str (as users pass it)."""
    return str(tmp_path / "ckpt")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) over HTTP on 127.0.0.1, for the whole test session.

    Reached through s3fs exactly as a user reaches MinIO or AWS: only the endpoint differs.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    server.stop()


@pytest.fixture
def s3_options(s3_server):
    """``storage_options`` for the test S3 server (endpoint and credentials)."""
    return dict(s3_server)


@pytest.fixture
def s3_root(s3_options):
    """A fresh bucket on the test S3 server; returns ``s3://<bucket>/run``."""
    import s3fs

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options).mkdir(bucket)
    return f"s3://{bucket}/run"


S3RVER = os.environ.get("DISTCKPT_S3RVER") or os.path.join(REPO, ".venv", "node", "node_modules", ".bin", "s3rver")


@pytest.fixture(scope="session")
def s3rver_server(tmp_path_factory):
    """A second S3 implementation, s3rver (Node, from the npm registry), over HTTP on
    127.0.0.1. Unlike AWS, MinIO and moto it ignores ``If-None-Match: *``: the store
    distckpt must detect and still keep one writer per root on."""
    if not os.path.exists(S3RVER):
        raise RuntimeError(
            f"s3rver is not installed at {S3RVER}; ./tests/run.sh installs it "
            "(npm install --prefix .venv/node s3rver@3.7.1), or set DISTCKPT_S3RVER"
        )
    port, data = free_port(), tmp_path_factory.mktemp("s3rver")
    proc = subprocess.Popen([S3RVER, "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "-s"])
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"s3rver did not start on {endpoint} (exit {proc.poll()})") from None
            time.sleep(0.1)
    yield {"endpoint_url": endpoint, "key": "S3RVER", "secret": "S3RVER"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(params=S3_SERVERS)
def any_s3(request):
    """``(url, storage_options)`` of a fresh bucket on each S3 implementation in turn."""
    return s3_bucket(request, request.param)
