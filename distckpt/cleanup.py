"""``distckpt gc``: retention from the command line, plus removal of stale uncommitted leftovers.

The rules are the training job's own (``Catalog.apply_retention``): a policy
(``distckpt.Keep``) picks what to keep, the newest committed step is always kept, and a step
is un-committed atomically (``Commit.delete``) before its files go, so a half-deleted step is
never listed. Leftovers (interrupted saves and deletes, step prefixes without a manifest on
object stores) may belong to a save in progress, so they are removed only when no job holds
the root's lease (or with ``force``). ``plan_gc`` decides and touches nothing; ``run_gc``
carries a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .info import CheckpointInfo
from .inspection import CheckpointReader, Leftover
from .log import log
from .manifest import parse_step_dirname
from .retention import RetentionPolicy


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
    keep_flags = policy.should_preserve(infos) if infos else []
    newest = max((c.step for c in infos), default=None)
    delete = [c for c, kept in zip(infos, keep_flags, strict=True) if not kept and c.step != newest]
    keep = [c for c in infos if c not in delete]
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
    deleted: list[int] = []
    removed: list[str] = []
    failed: dict[str, str] = {}
    for info in plan.delete:
        try:
            reader.catalog.commit.delete(info.step)
            deleted.append(info.step)
            log.info("gc deleted step %d", info.step)
        except OSError as e:
            failed[f"step {info.step}"] = _why(e)
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
