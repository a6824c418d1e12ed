"""What the tests share: real components (gloo ranks, an S3 fault proxy, a small disk, sshfs
nodes, torchrun/SLURM jobs) and small models. ``REPO`` is the repository root."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
