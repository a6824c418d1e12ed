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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from ..arena import DTensor, local_part
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


class PlanCache:
    """The plan of the last save of one Checkpointer's engine (see the module doc)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.hits = 0  # saves written from the remembered plan (for tests and stats)

    def usable(self, key: str, group: Any) -> bool:
        """(every rank of ``group``) True on all ranks when every rank's plan matches."""
        hit = self.plan is not None and self.plan.key == key
        if group is not None:
            votes: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(votes, hit, group=group)
            hit = all(votes)
        self.hits += hit
        return hit
