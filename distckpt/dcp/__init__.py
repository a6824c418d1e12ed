"""The bridge to ``torch.distributed.checkpoint``: the one way distckpt writes and reads tensors.

``write_items`` saves a flat ``{fqn: tensor}`` dict into a step's work directory through
``dcp.save`` with ``FastWriter`` (items framed and written straight from memory), or, when
the tensors are planned like last time, without DCP's planning (``plan_cache``), and returns
the files written (size and checksum, computed as written) plus the global tensor table.
``read_items`` fills tensors in place, through ``dcp.load`` (resharding as DCP does) unless
every tensor is plain and stored whole (``direct``). Engines (chief or sharded),
``restore()`` and the tools (``distckpt.open``, export, transfer) all go through these two
functions.

Modules: ``fs`` (DCP's file system over ``Storage``, checksumming writes), ``safe``
(no code from a checkpoint), ``shared_reader`` (each file read once across the ranks, in
order, checksummed on the way, items straight into place: ``scatter``), ``direct`` (a load of
plain tensors stored whole planned from ``state.json``'s index, not by DCP), ``errors``
(DCP's exceptions as ours).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..arena import local_part
from ..errors import CheckpointError, CorruptCheckpointError
from ..gc_paused import gc_paused
from ..layout.catalog import DCP_METADATA
from ..layout.manifest import FileRecord, checksum_stream
from ..storage import Storage
from ..tree import dtype_name
from . import direct
from .errors import unwrap_dcp_errors
from .fs import FileRecorder, StorageFS, StorageReader
from .index import METADATA_KEY, from_json, to_json
from .plan_cache import Plan, PlanCache
from .safe import SafeLoadPlanner, load_dcp_metadata
from .shared_reader import NodeLocal, ReadCounter, SharedReader
from .writer import FastWriter, write_files

__all__ = [
    "DCP_METADATA",
    "METADATA_KEY",
    "NodeLocal",
    "ReadCounter",
    "load_dcp_metadata",
    "read_items",
    "tensor_table",
    "unwrap_dcp_errors",
    "write_items",
]

# A single-process save or load is exactly what distckpt means when it passes no_dist.
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")


def write_items(
    tensors: dict[str, torch.Tensor],
    storage: Storage,
    workdir: str,
    *,
    rank: int,
    group: Any,
    threads: int,
    cache: PlanCache | None = None,
) -> tuple[list[FileRecord], dict[str, Any]]:
    """(every rank in ``group``, or one rank alone with ``group=None``) Write ``tensors`` into
    ``workdir``. Returns this rank's file records and, on rank 0, the global tensor table.
    With a ``cache``, a save planned like the previous one skips DCP's planning."""
    key = cache.key(tensors) if cache is not None else ""
    if cache is not None and cache.usable(key, group):
        with gc_paused():  # the data's write resumes it (writer.write_files)
            return _write_planned(cache, tensors, storage, workdir, rank)
    writer = FastWriter(storage, workdir, threads)
    try:
        with unwrap_dcp_errors(f"writing {workdir}", CheckpointError), gc_paused():
            md = _dcp_save(tensors, writer, group)
            table = _catalog(md) if rank == 0 else {}
    except CheckpointError as e:
        if writer.recorder.os_errors:  # the real cause, which torch's writer turned into a RuntimeError
            raise writer.recorder.os_errors[0] from e
        raise
    if cache is not None:
        metadata = storage.read_bytes(storage.join(workdir, DCP_METADATA)) if rank == 0 else None
        cache.plan = Plan(key, writer.layout, metadata, table, writer.placed)
    return writer.recorder.records(rank, _read_back(storage, workdir)), table


def _catalog(md: Metadata) -> dict[str, Any]:
    """What the coordinator adds to ``state.json``: the tensor table and DCP's metadata as JSON."""
    out: dict[str, Any] = {"tensors": tensor_table(md)}
    index = to_json(md)
    if index is not None:
        out[METADATA_KEY] = index
    return out


def _write_planned(
    cache: PlanCache, tensors: dict[str, torch.Tensor], storage: Storage, workdir: str, rank: int
) -> tuple[list[FileRecord], dict[str, Any]]:
    """This rank's files of a save planned like the last one, written without DCP."""
    plan = cache.plan
    assert plan is not None
    fs = StorageFS(storage, FileRecorder())
    files = [(name, [local_part(tensors[f]) for f in fqns]) for name, fqns in plan.files]
    placed = write_files(fs, workdir, files, cache.recall(plan))
    if placed != plan.placed:  # the signature covers what places items; this is the safety net
        cache.plan = None
        raise CheckpointError(
            f"the items of {workdir} landed at other offsets than the plan's metadata records; "
            "this save is not committed, and the next save plans again"
        )
    if rank == 0 and plan.metadata is not None:
        with fs.create_stream(fs.concat_path(workdir, DCP_METADATA), "wb") as f:
            f.write(plan.metadata)
    return fs.recorder.records(rank, _read_back(storage, workdir)), dict(plan.table or {}) if rank == 0 else {}


def _read_back(storage: Storage, workdir: str) -> Any:
    def read_back(name: str) -> tuple[int, str]:
        with storage.open_read(storage.join(workdir, name)) as f:
            return checksum_stream(f)

    return read_back


def read_items(
    tensors: dict[str, torch.Tensor],
    storage: Storage,
    stepdir: str,
    *,
    group: Any,
    contiguous: bool,
    share: Any = None,
    files: dict[str, FileRecord] | None = None,
    node_local: NodeLocal | None = None,
    metadata: dict[str, Any] | None = None,
) -> ReadCounter:
    """(every rank in ``group``, or one rank alone) Fill ``tensors`` in place from the step at
    ``stepdir``. ``contiguous``: its items are distckpt's own framed tensors, which
    ``SharedReader`` reads whole-file and in order, each file once across the ranks of
    ``share`` (a process group; None: this rank reads what it needs itself), checking each
    file read against ``files`` (the manifest's records; None: no checksums). Returns what
    was asked of storage. ``node_local``: on a node-local tier, which ranks of ``share`` hold
    each file and where this rank finds those it holds (the others receive them).
    ``metadata``: the step's DCP metadata as JSON (``state.json``), read instead of ``.metadata``."""
    if not tensors:
        return ReadCounter()
    if contiguous:
        threads = min(8, os.cpu_count() or 1)
        reader: Any = SharedReader(storage, stepdir, group=share, files=files, threads=threads, node_local=node_local)
        planned = direct.plan(tensors, metadata) if metadata is not None else None
        if not _no_dist(group):  # DCP's load is collective over group: every rank plans the same way
            planned = planned if _everyone(planned is not None, group) else None
        if planned is not None:
            with gc_paused():
                reader.read_direct(planned)
            return reader.counter
    else:
        reader = StorageReader(storage, stepdir)
    with unwrap_dcp_errors(f"reading {stepdir}", CorruptCheckpointError), gc_paused():
        if metadata is not None:
            reader.known_metadata = from_json(metadata, stepdir)
        _dcp_load(tensors, reader, SafeLoadPlanner(), group)
    return getattr(reader, "counter", ReadCounter())


# ``dcp.save`` and ``dcp.load`` call ``state_dict()`` / ``load_state_dict()`` on each
# ``Stateful`` value of the dict, and ``dcp.save`` wraps every value in a logging decorator
# that builds two log records: ~0.1 ms per value, 1 s for 10,000 tensors. distckpt only
# ever hands DCP a flat ``{fqn: tensor}`` dict, with no Stateful in it, so it calls the
# functions those two wrap. If a torch release renames them, the public calls still work.
_save_state_dict = getattr(state_dict_saver, "_save_state_dict", None)
_load_state_dict = getattr(state_dict_loader, "_load_state_dict", None)


def _no_dist(group: Any) -> bool:
    return group is None or not dist.is_available() or not dist.is_initialized()


def _everyone(flag: bool, group: Any) -> bool:
    """True on every rank of ``group`` (gloo) when ``flag`` is true on every rank."""
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _dcp_save(tensors: dict[str, torch.Tensor], writer: Any, group: Any) -> Metadata:
    if _save_state_dict is None:
        return dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
    return _save_state_dict(tensors, writer, process_group=group, no_dist=_no_dist(group))


def _dcp_load(tensors: dict[str, torch.Tensor], reader: Any, planner: Any, group: Any) -> None:
    if _load_state_dict is None:
        dcp.load(tensors, storage_reader=reader, planner=planner, process_group=group, no_dist=group is None)
        return
    # every rank loads the values in the same order, as dcp.load makes sure
    _load_state_dict(
        dict(sorted(tensors.items())), reader, process_group=group, no_dist=_no_dist(group), planner=planner
    )


def tensor_table(md: Metadata | None) -> dict[str, Any]:
    """Global shape and dtype of every tensor in DCP metadata, as JSON."""
    out: dict[str, Any] = {}
    for fqn, item in (md.state_dict_metadata if md else {}).items():
        if isinstance(item, TensorStorageMetadata):
            out[fqn] = {"shape": list(item.size), "dtype": dtype_name(item.properties.dtype)}
    return out
