"""distckpt: consistent, fast checkpoints for multi-rank PyTorch training.

Every rank calls the same API::

    ckpt = distckpt.Checkpointer("/mnt/ckpt/run7", {"model": model, "optim": optim},
                                 mode="sharded", keep=distckpt.Keep(last=3))
    ckpt.restore()                 # newest committed step, agreed by all ranks (None if none)
    ckpt.save(step, meta={"val_loss": 0.41})
    if ckpt.should_stop(step):     # with preemption=True: SIGTERM/SIGUSR1 on any rank
        ckpt.save_and_exit(step)   # final save, SLURM requeue or torchrun restart
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distckpt")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from .checkpointer import Checkpointer, SaveHandle
from .errors import (
    CheckpointError,
    CommitError,
    CorruptCheckpointError,
    DistckptError,
    IncompatibleCheckpointError,
    NoCheckpointError,
)
from .helpers import ResumableSampler, RNGState
from .info import CheckpointInfo, SaveStats
from .inspection import CheckpointReader, open
from .preemption import Preemption
from .recoverables import register_hooks
from .retention import Keep, RetentionPolicy
from .transfer import TransferReport, transfer

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReader",
    "CommitError",
    "CorruptCheckpointError",
    "DistckptError",
    "IncompatibleCheckpointError",
    "Keep",
    "NoCheckpointError",
    "Preemption",
    "RNGState",
    "ResumableSampler",
    "RetentionPolicy",
    "SaveHandle",
    "SaveStats",
    "TransferReport",
    "open",
    "register_hooks",
    "transfer",
    "__version__",
]
