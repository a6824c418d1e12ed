"""Engines: who writes which tensors, and how they are read back. Both write DCP folders.

``ShardedEngine``: every rank writes its own shards through ``dcp.save`` on the private
background gloo group; DCP deduplicates replicated tensors and reshards on load.
``ChiefEngine``: the state is gathered to full tensors on every rank (a collective for
FSDP/DTensor models), rank 0 alone writes it as a single-rank DCP folder, and every rank
reads the whole of it back.

Call order (see ``Engine``): (all ranks, training thread) adapters build the state with
``full_state``; (ranks where ``writes(ctx)``) stage it; (all ranks, background thread)
``write``; for restore (all ranks, training thread) ``read``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .dcp_io import SafeLoadPlanner, record_files
from .dist import RankContext
from .errors import CheckpointError, CorruptCheckpointError, DistckptError
from .manifest import FileRecord, checksum_stream
from .storage import Storage
from .tree import dtype_name

# A single-process save or load is exactly what distckpt means when it passes no_dist.
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")


class Engine(Protocol):
    mode: str
    full_state: bool

    def writes(self, ctx: RankContext) -> bool:
        """Whether this rank writes files (and so needs its state staged)."""
        ...

    def write(
        self, tensors: dict[str, torch.Tensor], workdir: str, storage: Storage, ctx: RankContext
    ) -> tuple[list[FileRecord], dict[str, Any]]:
        """(all ranks, background) Write this rank's files. Returns its file records and,
        on the chief, the global tensor table ``{fqn: {"shape", "dtype"}}``."""
        ...

    def read(
        self,
        tensors: dict[str, torch.Tensor],
        stepdir: str,
        storage: Storage,
        ctx: RankContext,
        contiguous: bool = False,
    ) -> None:
        """(all ranks, training thread) Fill ``tensors`` in place from the step at ``stepdir``;
        ``contiguous``: its items are known to be contiguous (the fast reader applies)."""
        ...


class _DcpEngine:
    mode = ""
    full_state = False

    def __init__(self, write_threads: int = 4) -> None:
        self.write_threads = max(1, int(write_threads))

    def writes(self, ctx: RankContext) -> bool:
        raise NotImplementedError

    def _group(self, ctx: RankContext, name: str) -> Any:
        """The process group DCP coordinates on (``name``: the calling thread's), or None."""
        raise NotImplementedError

    def write(
        self, tensors: dict[str, torch.Tensor], workdir: str, storage: Storage, ctx: RankContext
    ) -> tuple[list[FileRecord], dict[str, Any]]:
        if not self.writes(ctx):
            return [], {}
        return self._save(tensors, workdir, storage, ctx.rank, self._group(ctx, "bg"))

    def read(
        self,
        tensors: dict[str, torch.Tensor],
        stepdir: str,
        storage: Storage,
        ctx: RankContext,
        contiguous: bool = False,
    ) -> None:
        self._load(tensors, stepdir, storage, self._group(ctx, "fg"), contiguous)

    def _save(
        self, tensors: dict[str, torch.Tensor], workdir: str, storage: Storage, rank: int, group: Any
    ) -> tuple[list[FileRecord], dict[str, Any]]:
        writer = storage.dcp_writer(workdir, self.write_threads)
        recorder = record_files(writer)
        try:
            with _unwrap_dcp_errors(f"writing {workdir}", CheckpointError):
                md = dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
        except CheckpointError as e:
            if recorder.os_errors:  # the real cause, which torch's writer turned into a RuntimeError
                raise recorder.os_errors[0] from e
            raise

        def read_back(name: str) -> tuple[int, str]:
            with storage.open_read(storage.join(workdir, name)) as f:
                return checksum_stream(f)

        # dcp.save returns the global metadata on every rank; only the chief's table is used
        return recorder.to_file_records(rank, read_back), tensor_table(md) if rank == 0 else {}

    def _load(
        self, tensors: dict[str, torch.Tensor], stepdir: str, storage: Storage, group: Any, contiguous: bool
    ) -> None:
        if not tensors:
            return
        with _unwrap_dcp_errors(f"reading {stepdir}", CorruptCheckpointError):
            dcp.load(
                tensors,
                storage_reader=storage.dcp_reader(stepdir, contiguous),
                planner=SafeLoadPlanner(),
                process_group=group,
                no_dist=group is None,
            )


class ShardedEngine(_DcpEngine):
    mode = "sharded"
    full_state = False

    def writes(self, ctx: RankContext) -> bool:
        return True

    def _group(self, ctx: RankContext, name: str) -> Any:
        return ctx.groups[name] if ctx.distributed else None


class ChiefEngine(_DcpEngine):
    mode = "chief"
    full_state = True

    def writes(self, ctx: RankContext) -> bool:
        return ctx.is_chief

    def _group(self, ctx: RankContext, name: str) -> Any:
        return None  # the chief writes alone and every rank reads the whole state alone


@contextlib.contextmanager
def _unwrap_dcp_errors(what: str, kind: type[DistckptError]) -> Iterator[None]:
    """DCP raises ``CheckpointException`` (a BaseException) carrying per-rank tracebacks;
    turn it into one of ours with each rank's underlying error, and keep ours as they are."""
    try:
        yield
    except CheckpointException as e:
        causes = {rank: pair[0] for rank, pair in e.failures.items()}
        ours = [c for c in causes.values() if isinstance(c, DistckptError)]
        if ours:
            raise ours[0] from None
        detail = "; ".join(
            f"rank {r}: {type(c).__name__}: {str(c).splitlines()[0] if str(c) else ''}"
            for r, c in sorted(causes.items())
        )
        if kind is CheckpointError:
            raise CheckpointError(
                f"{what} failed", {r: c for r, c in causes.items() if isinstance(c, Exception)}
            ) from None
        raise kind(f"{what} failed ({detail}); this step is damaged, restore an older one") from None


def make_engine(mode: str, write_threads: int = 4) -> Engine:
    engines = {"sharded": ShardedEngine, "chief": ChiefEngine}
    if mode not in engines:
        raise ValueError(f"mode must be 'sharded' or 'chief', got {mode!r}")
    return engines[mode](write_threads)


def tensor_table(md: Metadata | None) -> dict[str, Any]:
    """Global shape and dtype of every tensor in DCP metadata, as JSON."""
    out: dict[str, Any] = {}
    for fqn, item in (md.state_dict_metadata if md else {}).items():
        if isinstance(item, TensorStorageMetadata):
            out[fqn] = {"shape": list(item.size), "dtype": dtype_name(item.properties.dtype)}
    return out
