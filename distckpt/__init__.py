"""distckpt: consistent, fast checkpoints for multi-rank PyTorch training.

Every rank calls the same API::

    ckpt = distckpt.Checkpointer("/mnt/ckpt/run7", {"model": model, "optim": optim},
                                 mode="sharded", keep=distckpt.Keep(last=3))
    ckpt.restore()                 # newest committed step, agreed by all ranks (None if none)
    ckpt.save(step, meta={"val_loss": 0.41})
    if ckpt.should_stop(step):     # with preemption=True: SIGTERM/SIGUSR1 on any rank
        ckpt.save_and_exit(step)   # final save, SLURM requeue or torchrun restart

This module holds the public names only. The package's layers (README, "How it works"):
``storage/`` (where bytes live), ``layout/`` (the on-storage contract: manifest, commit,
catalog, lease, tiers), ``dcp/`` (the bridge to torch.distributed.checkpoint), the core
at the top level (``checkpointer`` -> ``save`` / ``restore``, ``staging``, ``recoverables``,
``ranks``, ``topology``, ``retention``, ``preemption``), ``tools/`` (reader, gc, export,
transfer, the command line), ``integrations/`` (Lightning, Accelerate, transformers; imported
only by name) and ``bench/``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distckpt")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from . import _moved
from .checkpointer import Checkpointer
from .errors import (
    CheckpointError,
    CommitError,
    CorruptCheckpointError,
    DistckptError,
    IncompatibleCheckpointError,
    NoCheckpointError,
)
from .layout.catalog import CheckpointInfo, SaveStats
from .preemption import Preemption
from .recoverables import mark_as_loader, mark_as_saver, register_checkpoint_hooks, register_hooks
from .resumable import ResumableSampler, RNGState
from .retention import (
    Among,
    Keep,
    KeepAll,
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepEverySteps,
    KeepIf,
    KeepLast,
    KeepNewerThan,
    RetentionPolicy,
)
from .save_job import SaveHandle
from .schedule import (
    SaveAny,
    SaveAt,
    SaveContext,
    SaveContinuously,
    SaveDenseEarly,
    SaveEverySeconds,
    SaveEverySteps,
    SaveInitial,
    SaveOnPreemption,
    SavePolicy,
)
from .tools.reader import CheckpointReader, open
from .tools.transfer import TransferReport, transfer

_moved.install()

__all__ = [
    "Among",
    "Checkpointer",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReader",
    "CommitError",
    "CorruptCheckpointError",
    "DistckptError",
    "IncompatibleCheckpointError",
    "Keep",
    "KeepAll",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepEverySteps",
    "KeepIf",
    "KeepLast",
    "KeepNewerThan",
    "mark_as_loader",
    "mark_as_saver",
    "NoCheckpointError",
    "open",
    "Preemption",
    "register_checkpoint_hooks",
    "register_hooks",
    "ResumableSampler",
    "RetentionPolicy",
    "RNGState",
    "SaveAny",
    "SaveAt",
    "SaveContext",
    "SaveContinuously",
    "SaveDenseEarly",
    "SaveEverySeconds",
    "SaveEverySteps",
    "SaveHandle",
    "SaveInitial",
    "SaveOnPreemption",
    "SavePolicy",
    "SaveStats",
    "transfer",
    "TransferReport",
    "__version__",
]
