"""What the tests share: real components (gloo ranks, S3 servers and a fault proxy, a small
disk, sshfs nodes, torchrun/SLURM jobs) and small models. ``REPO`` is the repository root."""

import os
import socket

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
