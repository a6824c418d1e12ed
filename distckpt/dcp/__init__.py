"""The bridge to ``torch.distributed.checkpoint``: the one way distckpt writes and reads tensors.

``write_items`` saves a flat ``{fqn: tensor}`` dict into a step's work directory through
``dcp.save`` and returns the files written (size and checksum, computed as written) plus
the global tensor table; ``read_items`` fills tensors in place through ``dcp.load``,
resharding as DCP does. Engines (chief or sharded), ``restore()`` and the tools
(``distckpt.open``, export, transfer) all go through these two functions.

Modules: ``fs`` (DCP's file system over ``Storage``, checksumming writes), ``safe``
(no code from a checkpoint), ``fast_reader`` (raw reads of distckpt's contiguous items
straight into place), ``errors`` (DCP's exceptions as ours).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..errors import CheckpointError, CorruptCheckpointError
from ..layout.catalog import DCP_METADATA
from ..layout.manifest import FileRecord, checksum_stream
from ..storage import PosixStorage, Storage
from ..tree import dtype_name
from .errors import unwrap_dcp_errors
from .fs import StorageReader, StorageWriter
from .safe import SafeLoadPlanner, load_dcp_metadata

__all__ = ["DCP_METADATA", "load_dcp_metadata", "read_items", "tensor_table", "unwrap_dcp_errors", "write_items"]

# A single-process save or load is exactly what distckpt means when it passes no_dist.
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")


def write_items(
    tensors: dict[str, torch.Tensor], storage: Storage, workdir: str, *, rank: int, group: Any, threads: int
) -> tuple[list[FileRecord], dict[str, Any]]:
    """(every rank in ``group``, or one rank alone with ``group=None``) Write ``tensors`` into
    ``workdir``. Returns this rank's file records and, on rank 0, the global tensor table."""
    writer = StorageWriter(storage, workdir, threads)
    try:
        with unwrap_dcp_errors(f"writing {workdir}", CheckpointError):
            md = dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
    except CheckpointError as e:
        if writer.recorder.os_errors:  # the real cause, which torch's writer turned into a RuntimeError
            raise writer.recorder.os_errors[0] from e
        raise

    def read_back(name: str) -> tuple[int, str]:
        with storage.open_read(storage.join(workdir, name)) as f:
            return checksum_stream(f)

    # dcp.save returns the global metadata on every rank; only the chief's table is used
    return writer.recorder.records(rank, read_back), tensor_table(md) if rank == 0 else {}


def read_items(
    tensors: dict[str, torch.Tensor], storage: Storage, stepdir: str, *, group: Any, contiguous: bool
) -> None:
    """(every rank in ``group``, or one rank alone) Fill ``tensors`` in place from the step at
    ``stepdir``. ``contiguous``: its items are plain contiguous tensors (distckpt's staged
    saves), which local storage reads raw, straight into place."""
    if not tensors:
        return
    if contiguous and isinstance(storage, PosixStorage):
        from .fast_reader import FastReader

        reader: Any = FastReader(storage, stepdir, threads=min(8, os.cpu_count() or 1))
    else:
        reader = StorageReader(storage, stepdir)
    with unwrap_dcp_errors(f"reading {stepdir}", CorruptCheckpointError):
        dcp.load(tensors, storage_reader=reader, planner=SafeLoadPlanner(), process_group=group, no_dist=group is None)


def tensor_table(md: Metadata | None) -> dict[str, Any]:
    """Global shape and dtype of every tensor in DCP metadata, as JSON."""
    out: dict[str, Any] = {}
    for fqn, item in (md.state_dict_metadata if md else {}).items():
        if isinstance(item, TensorStorageMetadata):
            out[fqn] = {"shape": list(item.size), "dtype": dtype_name(item.properties.dtype)}
    return out
