"""Fixtures for every layer, and the layer markers.

Tests live in ``unit/`` (in-process, seconds), ``multirank/`` (real gloo ranks in separate
processes) and ``system/`` (torchrun, SLURM, sshfs, S3 faults, the demo and the CLI as
subprocesses); each test is marked with its folder's name, so ``./tests/run.sh -m unit``
runs one layer. ``support/`` holds what they share.
"""

import logging
import os
import uuid

import pytest

logging.getLogger("distckpt").setLevel(logging.INFO)
logging.getLogger("werkzeug").setLevel(logging.WARNING)

LAYERS = ("unit", "multirank", "system")


def pytest_collection_modifyitems(items):
    for item in items:
        layer = os.path.basename(os.path.dirname(str(item.path)))
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


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
