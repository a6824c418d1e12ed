"""Which committed checkpoints to keep: the one-method ``RetentionPolicy`` and ``Keep``.

A policy only says what it would keep. ``preserved`` adds the rule every deletion obeys —
never the newest committed step, nor one ``protect`` names (a step still uploading) — and
``apply`` deletes the rest. Retention runs on the tier's owner (the chief, or a node's
leader for its local disk), after a commit, never before; a failed delete is logged and
retried after the next commit. ``distckpt gc`` plans with the same ``preserved``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .layout.catalog import Catalog, CheckpointInfo, metric_value
from .log import log


@runtime_checkable
class RetentionPolicy(Protocol):
    """``should_preserve(checkpoints)``: one bool per checkpoint (given oldest first).

    Called on the tier's owner after each commit (and by ``Checkpointer.delete`` and
    ``distckpt gc``) with every committed checkpoint of the tier; it must not touch storage.
    """

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]: ...


@dataclass(frozen=True, kw_only=True)
class Keep:
    """Keep the union of: the newest ``last``; the ``best`` by ``meta[metric]``
    (``best_mode`` "min" or "max"); every step divisible by ``every_steps``.
    ``Keep()`` keeps everything; like every policy, it never loses the newest checkpoint.

    Checkpoints whose meta lacks ``metric`` (or holds NaN) never count as best; they are
    kept only by the other rules.
    """

    last: int | None = None
    best: int | None = None
    metric: str | None = None
    best_mode: str = "min"
    every_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("last", "best", "every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Keep({name}=...) must be a positive int or None, got {value!r}")
        if self.best is not None and not self.metric:
            raise ValueError("Keep(best=K) needs metric='<meta key>' to rank checkpoints by")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"Keep(best_mode=...) must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def keeps_all(self) -> bool:
        return self.last is None and self.best is None and self.every_steps is None

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        n = len(checkpoints)
        if self.keeps_all:
            return [True] * n
        keep = [False] * n
        if self.last is not None:
            for i in sorted(range(n), key=lambda i: checkpoints[i].step)[-self.last :]:
                keep[i] = True
        if self.every_steps is not None:
            for i in range(n):
                keep[i] = keep[i] or checkpoints[i].step % self.every_steps == 0
        if self.best is not None:
            for i in self._best(checkpoints):
                keep[i] = True
        return keep

    def _best(self, checkpoints: Sequence[CheckpointInfo]) -> list[int]:
        scored = []
        for i, c in enumerate(checkpoints):
            value = metric_value(c.meta.get(self.metric)) if self.metric else None
            if value is not None:
                scored.append((value if self.best_mode == "min" else -value, -c.step, i))
        return [i for _, _, i in sorted(scored)[: self.best]]


def preserved(
    policy: RetentionPolicy, infos: Sequence[CheckpointInfo], protect: Callable[[int], bool] = lambda s: False
) -> list[bool]:
    """``policy``'s choice plus the rule every deletion obeys: the newest committed step and
    the steps ``protect`` names are kept whatever the policy says."""
    if not infos:
        return []
    flags = policy.should_preserve(infos)
    if len(flags) != len(infos):
        raise ValueError(f"{policy!r}.should_preserve returned {len(flags)} flags for {len(infos)} checkpoints")
    newest = max(c.step for c in infos)
    return [bool(f) or c.step == newest or protect(c.step) for c, f in zip(infos, flags, strict=True)]


def apply(policy: RetentionPolicy, catalog: Catalog, protect: Callable[[int], bool] = lambda s: False) -> list[int]:
    """(the tier's owner) Delete what ``preserved`` does not keep; returns the deleted steps."""
    infos = catalog.list()
    doomed = [c.step for c, kept in zip(infos, preserved(policy, infos, protect), strict=True) if not kept]
    deleted, failed = catalog.delete(doomed)
    for step, e in failed.items():
        log.warning("retention could not delete step %d (%s); will retry after the next save", step, e)
    if deleted:
        log.info("retention deleted steps %s", deleted)
    return deleted


def as_policy(keep: Any) -> RetentionPolicy:
    if keep is None:
        return Keep()
    if isinstance(keep, RetentionPolicy):
        return keep
    raise TypeError(f"keep= needs a distckpt.Keep or an object with should_preserve(), got {keep!r}")
