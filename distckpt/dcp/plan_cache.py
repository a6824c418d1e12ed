"""Saves after the first skip DCP's planning: the cost per tensor of a repeated save is a write.

``dcp.save`` plans every save from scratch: it walks the state dict, builds a write item
per tensor, gathers the plans on the coordinator, deduplicates replicated tensors, builds
and pickles the global metadata - about 0.5 ms per tensor here, a minute per save for a
chief holding a MoE's 190k tensors. Between two saves of one training job none of it
changes unless the tensors' names, shapes, dtypes or shardings do. So the first save goes
through ``dcp.save`` (with ``FastWriter``) and remembers what came out: which of its
tensors this rank wrote, in which file and order, and (on the coordinator) the metadata
file's bytes and the tensor table. A later save whose tensors have the same
``signature`` on every rank writes the same files in the same order directly; since a
tensor's framed size depends only on its dtype and shape, every offset in the remembered
metadata is again exact, and the checkpoint is byte-for-byte what ``dcp.save`` would write
(the data aside). Whether every rank hits is agreed with one all-gather of a bool.

A background save hands the writer the same tensors every time: the staging pool's views,
made once per layout (``arena.Layout``). For those, what the writer derives from the
tensors alone - the signature, where each item goes in its file, the writer process's
program - is remembered too (``Seen``, one per arena: with ``max_in_flight=2`` saves take
turns between two arenas), so that a save of a state of 100,000 tensors does
no per-tensor work beyond a check that each is the very view it was last time (live
tensors, which their owner may give new storage, are always looked at afresh).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from ..arena import DTensor, find_arena, local_part, shared_arenas
from .write_child import ALIGN_MIN


def signature(tensors: dict[str, torch.Tensor]) -> str:
    """What the plan depends on: names in order, dtypes, shapes and shardings, and where a
    big host tensor sits in memory modulo the O_DIRECT block (its gap in the file)."""
    h = xxhash.xxh3_64()
    for fqn, t in tensors.items():
        local = local_part(t)
        h.update(f"{fqn}|{t.dtype}|{tuple(t.shape)}|{tuple(local.shape)}".encode())
        if local.nbytes >= ALIGN_MIN and local.device.type == "cpu":
            h.update(f"|{local.data_ptr() % 4096}".encode())
        if DTensor is not None and isinstance(t, DTensor):
            h.update(f"|{t.placements}|{t.device_mesh.shape}|{t.device_mesh.get_coordinate()}".encode())
    return h.hexdigest()


@dataclass
class Plan:
    key: str
    files: list[tuple[str, list[str]]]  # file name -> the fqns this rank writes into it, in order
    metadata: bytes | None = None  # the coordinator's .metadata, as written
    table: dict[str, Any] | None = None  # the coordinator's tensor table
    placed: list[list[tuple[int, int]]] | None = None  # each file's items as (offset, length)


@dataclass
class Seen:
    """The last save's tensors when they were all staging views, and what was derived from them."""

    names: list[str]
    tensors: list[torch.Tensor]  # held: their ids cannot be reused while remembered
    key: str
    plan: Plan | None = None  # the plan ``placement`` was made for
    placement: Any = None  # the writer's placement of the plan's files (``writer.Placement``)


class PlanCache:
    """The plan of the last save of one Checkpointer's engine (see the module doc)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.seen: Seen | None = None  # this save's views (found by ``key``), or None for live tensors
        # the last views staged in each arena: with ``max_in_flight`` > 1 saves take turns
        # between arenas, and each arena's views come back every other save
        self._by_arena: dict[int, Seen] = {}
        self.hits = 0  # saves written from the remembered plan (for tests and stats)
        self.recalled = 0  # saves whose tensors were the very views of an earlier save

    def key(self, tensors: dict[str, torch.Tensor]) -> str:
        """``signature(tensors)``; not computed again for the very views of an earlier save
        in the same arena."""
        values = list(tensors.values())
        arena = _arena_of(values)
        seen = self._by_arena.get(arena) if arena is not None else None
        if (
            seen is not None
            and len(seen.tensors) == len(values)
            and all(map(operator.is_, seen.tensors, values))
            and seen.names == list(tensors)
        ):
            self.recalled += 1
            self.seen = seen
            return seen.key
        key = signature(tensors)
        self.seen = None
        if arena is not None:
            self.seen = Seen(list(tensors), values, key)
            live = {id(a) for a in shared_arenas().values()}
            self._by_arena = {a: s for a, s in self._by_arena.items() if a in live}  # closed arenas: let go
            self._by_arena[arena] = self.seen
        return key

    def recall(self, plan: Plan) -> Seen | None:
        """What was derived from this save's tensors for ``plan``, if they are the last save's
        views (``key`` said so) and the plan is the one they were placed for; else a fresh
        record to fill (or None when the tensors are live)."""
        seen = self.seen
        if seen is None:
            return None
        if seen.plan is not plan:
            seen.plan, seen.placement = plan, None
        return seen

    def forget(self) -> None:
        """Let go of the remembered views (the staging pool is closing)."""
        self.seen = None
        self._by_arena = {}

    def usable(self, key: str, group: Any) -> bool:
        """(every rank of ``group``) True on all ranks when every rank's plan matches."""
        hit = self.plan is not None and self.plan.key == key
        if group is not None:
            votes: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(votes, hit, group=group)
            hit = all(votes)
        self.hits += hit
        return hit


def _arena_of(tensors: list[torch.Tensor]) -> int | None:
    """``id`` of the shared staging arena (memory only the pool writes) that every tensor is
    a plain view of; None when any is not (live tensors, DTensors)."""
    arenas = list(shared_arenas().values())
    if not arenas or not tensors or type(tensors[0]) is not torch.Tensor:
        return None
    found = find_arena(tensors[0], arenas)
    if found is None:
        return None
    arena = found[0]
    if all(type(t) is torch.Tensor and arena.locate(t) is not None for t in tensors):
        return id(arena)
    return None
