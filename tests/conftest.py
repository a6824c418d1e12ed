import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/harness.py, for spawned ranks too

logging.getLogger("distckpt").setLevel(logging.INFO)


@pytest.fixture
def root(tmp_path):
    """A checkpoint root directory as a str (as users pass it)."""
    return str(tmp_path / "ckpt")
