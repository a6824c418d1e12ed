"""The rank context: who this process is, and how the ranks agree.

Every collective distckpt runs goes through a ``Ranks``. ``RankContext`` implements it on
private gloo groups that each ``Checkpointer`` makes (a collective: every rank constructs
its Checkpointer in the same order): ``fg`` for the training thread (restore, the
preemption vote), ``bg`` for the save thread, ``up`` for the uploader's thread. A thread
only ever uses its own group, so their collectives never interleave; none runs on the
default group, and never NCCL off the main thread (DCP's background collectives deadlock
on a group the training thread also uses). With one rank no process group is needed.

``agree(fn)`` is the exception-robust building block: every rank runs ``fn``, the results
or errors are all-gathered, and an error on any rank becomes ``CheckpointError`` on all.
Decisions only the chief can make (which step to restore) are ``agree`` calls whose ``fn``
does the work on the chief and returns ``None`` elsewhere: the chief's answer is
``result[0]`` on every rank.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from .errors import CheckpointError, DistckptError, RemoteError

T = TypeVar("T")


class Ranks(Protocol):
    """Collectives over one job's ranks. Every method is called by every rank, in the same
    order, from the thread that owns the named group (``on=``)."""

    rank: int
    world_size: int

    @property
    def is_chief(self) -> bool: ...

    def group(self, name: str) -> Any:
        """The process group behind ``name`` for libraries that need one (DCP); ``None``
        with one rank."""
        ...

    def all_gather(self, obj: Any, *, on: str = "fg") -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        ...

    def any_true(self, flag: bool, *, on: str = "fg") -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        ...

    def barrier(self, *, on: str = "fg") -> None: ...

    def agree(self, fn: Callable[[], T], what: str, *, on: str = "fg") -> list[T]:
        """Run ``fn`` on every rank; every rank's result in rank order, or, when ``fn`` raised
        on any rank, ``CheckpointError("<what> failed", {rank: error})`` on every rank."""
        ...


class RankContext:
    """``Ranks`` over private gloo groups (see the module doc); world size 1 needs no process
    group at all. ``add_group(name)`` makes another private group (a collective)."""

    def __init__(self, process_group: Any = None, timeout: timedelta = timedelta(minutes=30)) -> None:
        self.timeout = timeout
        self.groups: dict[str, Any] = {}
        if process_group == "local":  # this process alone: no collectives (see Checkpointer)
            self.rank, self.world_size = 0, 1
            self._ranks = None
            return
        if not (dist.is_available() and dist.is_initialized()):
            env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            if env_world > 1:
                raise DistckptError(
                    f"WORLD_SIZE={env_world} but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() before creating the Checkpointer"
                )
            self.rank, self.world_size = 0, 1
            self._ranks = None
            return
        self._ranks = dist.get_process_group_ranks(process_group) if process_group is not None else None
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.add_group("fg")
        self.add_group("bg")

    def add_group(self, name: str) -> None:
        if self.distributed:
            self.groups[name] = dist.new_group(ranks=self._ranks, backend="gloo", timeout=self.timeout)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def group(self, name: str) -> Any:
        return self.groups[name] if self.distributed else None

    def all_gather(self, obj: Any, *, on: str = "fg") -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.groups[on])
        return out

    def any_true(self, flag: bool, *, on: str = "fg") -> bool:
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.groups[on])
        return bool(t.item())

    def barrier(self, *, on: str = "fg") -> None:
        if self.distributed:
            dist.barrier(group=self.groups[on])

    def agree(self, fn: Callable[[], T], what: str, *, on: str = "fg") -> list[T]:
        local_err: BaseException | None = None
        try:
            payload: tuple[Any, Any] = (fn(), None)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 - every failure must reach the other ranks
            # (torch's CheckpointException derives from BaseException, hence the breadth)
            local_err = e
            payload = (None, describe(e))
        gathered = self.all_gather(payload, on=on)
        errors: dict[int, BaseException] = {}
        for r, (_, desc) in enumerate(gathered):
            if desc is not None:
                errors[r] = local_err if r == self.rank and local_err else RemoteError(r, *desc)
        if errors:
            raise CheckpointError(f"{what} failed", errors) from local_err
        return [value for value, _ in gathered]


def describe(exc: BaseException) -> tuple[str, str, str]:
    """An exception as plain text that any rank can rebuild into a ``RemoteError``."""
    return type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))
