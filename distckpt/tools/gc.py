"""``distckpt gc``: retention from the command line, plus removal of stale uncommitted leftovers.

The rules are the training job's own: ``retention.preserved`` picks what to keep (a policy
such as ``distckpt.Keep``, and never the newest committed step), and ``Catalog.delete``
un-commits a step atomically before its files go, so a half-deleted step is never listed. Leftovers (interrupted saves and deletes, step prefixes without a manifest on
object stores) may belong to a save in progress, so they are removed only when no job holds
the root's lease (or with ``force``). ``plan_gc`` decides and touches nothing; ``run_gc``
carries a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..layout.catalog import CheckpointInfo
from ..layout.manifest import parse_step_dirname
from ..log import log
from ..retention import RetentionPolicy, preserved
from .reader import CheckpointReader, Leftover


@dataclass(frozen=True)
class GcPlan:
    """What ``gc`` would do: steps to delete and keep, leftovers to remove."""

    delete: list[CheckpointInfo]
    keep: list[CheckpointInfo]
    leftovers: list[Leftover]
    # leftovers found but spared, and why (a live job holds the root)
    spared: list[Leftover] = field(default_factory=list)
    spared_reason: str = ""


@dataclass(frozen=True)
class GcResult:
    deleted: list[int]
    removed: list[str]
    failed: dict[str, str]  # what could not be removed -> why

    @property
    def ok(self) -> bool:
        return not self.failed


def plan_gc(reader: CheckpointReader, policy: RetentionPolicy, *, force: bool = False) -> GcPlan:
    """Apply ``policy`` to the committed steps (never dropping the newest) and find leftovers."""
    infos = reader.list()
    flags = preserved(policy, infos)
    delete = [c for c, kept in zip(infos, flags, strict=True) if not kept]
    keep = [c for c, kept in zip(infos, flags, strict=True) if kept]
    leftovers = reader.leftovers()
    lease = reader.lease()
    if leftovers and lease is not None and lease["live"] and not force:
        reason = (
            f"job {lease.get('job', '?')} holds the root (lease refreshed {lease['age_s']:.0f} s ago), so they may "
            "be saves in progress; that job removes its own, or pass --force once it is gone"
        )
        return GcPlan(delete, keep, [], leftovers, reason)
    return GcPlan(delete, keep, leftovers)


def run_gc(reader: CheckpointReader, plan: GcPlan) -> GcResult:
    """Delete the planned steps (un-commit first), then the planned leftovers. Failures are
    collected, not raised, so one stuck file does not stop the rest."""
    removed: list[str] = []
    deleted, errors = reader.catalog.delete(info.step for info in plan.delete)
    for step in deleted:
        log.info("gc deleted step %d", step)
    failed: dict[str, str] = {f"step {step}": _why(e) for step, e in errors.items()}
    for left in plan.leftovers:
        step = parse_step_dirname(left.name)
        if step is not None and reader.catalog.is_committed(step):
            continue  # a save committed it since the plan was made: it is a step now, keep it
        try:
            reader.storage.rmtree(left.path)
            removed.append(left.path)
        except FileNotFoundError:
            removed.append(left.path)  # gone already (its job cleaned up)
        except OSError as e:
            failed[left.path] = _why(e)
    return GcResult(deleted, removed, failed)


def _why(e: Any) -> str:
    return f"{type(e).__name__}: {e}"
