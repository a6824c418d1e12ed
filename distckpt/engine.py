"""Engines: which ranks write which tensors, and how every rank reads them back.

Both write plain DCP folders through ``distckpt.dcp`` (so ``dcp.load`` reads any step):

* ``ShardedEngine``: every rank writes its own shards through ``dcp.save`` on the
  Checkpointer's private gloo group; DCP deduplicates replicated tensors and reshards on load.
* ``ChiefEngine``: the state is gathered to full tensors (a collective for FSDP/DTensor
  models, done by the recoverables with ``full_state``), rank 0 alone writes it as a
  single-rank DCP folder, and every rank loads the whole of it back (the files themselves
  are read once across the ranks and broadcast: ``dcp.shared_reader``).

Call order: (all ranks, training thread) the recoverables build the state, full or sharded
as ``full_state`` says; (ranks where ``writes(ranks)``) the stager copies it; (all ranks,
save thread) ``write``; for a restore (all ranks, training thread) ``read``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .dcp import NodeLocal, ReadCounter, read_items, write_items
from .dcp.plan_cache import PlanCache
from .layout.manifest import FileRecord
from .ranks import Ranks
from .storage import Storage


class Engine(Protocol):
    mode: str  #: recorded in the manifest: "sharded" or "chief"
    full_state: bool  #: recoverables hand over full (gathered) tensors, not local shards

    def writes(self, ranks: Ranks) -> bool:
        """Whether this rank writes files (and so needs its state staged)."""
        ...

    def write(
        self, tensors: dict[str, torch.Tensor], workdir: str, storage: Storage, ranks: Ranks
    ) -> tuple[list[FileRecord], dict[str, Any]]:
        """(all ranks, save thread) Write this rank's files. Returns its file records and,
        on the chief, what ``state.json`` holds of the tensors: ``"tensors"``, the global
        table ``{fqn: {"shape", "dtype"}}``, and ``"dcp_metadata"`` (``dcp/index.py``)."""
        ...

    def read(
        self,
        tensors: dict[str, torch.Tensor],
        stepdir: str,
        storage: Storage,
        ranks: Ranks,
        contiguous: bool,
        *,
        shared: bool = True,
        files: dict[str, FileRecord] | None = None,
        node_local: NodeLocal | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ReadCounter:
        """(all ranks, training thread) Fill ``tensors`` in place from the step at ``stepdir``;
        ``contiguous``: its items are distckpt's own framed tensors (the shared reader
        applies); ``shared``: every rank sees the same files (each is then read once across
        the ranks); ``files``: the manifest's records, to checksum the files as they are read;
        ``node_local``: on a node-local tier, the ranks whose node holds each file (its
        own copy or a partner's replica) and where this rank finds them; ``metadata``: the
        step's DCP metadata as JSON, when ``state.json`` has it (no ``.metadata`` read)."""
        ...


class ShardedEngine:
    mode = "sharded"
    full_state = False

    def __init__(self, write_threads: int = 4) -> None:
        self.write_threads = max(1, int(write_threads))
        self.plans = PlanCache()  # repeated saves skip DCP's planning (dcp/plan_cache.py)

    def writes(self, ranks: Ranks) -> bool:
        return True

    def write(
        self, tensors: dict[str, torch.Tensor], workdir: str, storage: Storage, ranks: Ranks
    ) -> tuple[list[FileRecord], dict[str, Any]]:
        group = ranks.group("bg")  # the save thread's private group
        return write_items(
            tensors, storage, workdir, rank=ranks.rank, group=group, threads=self.write_threads, cache=self.plans
        )

    def read(
        self,
        tensors: dict[str, torch.Tensor],
        stepdir: str,
        storage: Storage,
        ranks: Ranks,
        contiguous: bool,
        *,
        shared: bool = True,
        files: dict[str, FileRecord] | None = None,
        node_local: NodeLocal | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ReadCounter:
        share = ranks.group("fg") if shared or node_local else None  # who reads each file once for the others
        group = self._load_group(ranks)
        return read_items(
            tensors, storage, stepdir, group=group, contiguous=contiguous, share=share, files=files,
            node_local=node_local, metadata=metadata,
        )  # fmt: skip

    def _load_group(self, ranks: Ranks) -> Any:
        """The group DCP plans the load over: every rank's own shards."""
        return ranks.group("fg")


class ChiefEngine(ShardedEngine):
    mode = "chief"
    full_state = True

    def writes(self, ranks: Ranks) -> bool:
        return ranks.is_chief

    def write(
        self, tensors: dict[str, torch.Tensor], workdir: str, storage: Storage, ranks: Ranks
    ) -> tuple[list[FileRecord], dict[str, Any]]:
        if not ranks.is_chief:
            return [], {}
        return write_items(tensors, storage, workdir, rank=0, group=None, threads=self.write_threads, cache=self.plans)

    def _load_group(self, ranks: Ranks) -> Any:
        """None: every rank loads the full state on its own (the files are still read once
        across the ranks and broadcast)."""
        return None


ENGINES: dict[str, type[ShardedEngine]] = {"sharded": ShardedEngine, "chief": ChiefEngine}


def make_engine(mode: str, write_threads: int = 4) -> Engine:
    if mode not in ENGINES:
        raise ValueError(f"mode must be 'sharded' or 'chief', got {mode!r}")
    return ENGINES[mode](write_threads)
