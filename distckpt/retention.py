"""Which committed checkpoints to keep: ``Keep`` and the one-method ``RetentionPolicy``.

Retention runs on the chief only, after a commit (never before), and never removes the
newest committed step. A failed delete is logged and skipped; the next commit retries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .info import CheckpointInfo


@runtime_checkable
class RetentionPolicy(Protocol):
    """``should_preserve(checkpoints)``: one bool per checkpoint (given oldest first)."""

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]: ...


@dataclass(frozen=True, kw_only=True)
class Keep:
    """Keep the union of: the newest ``last``; the ``best`` by ``meta[metric]``
    (``best_mode`` "min" or "max"); every step divisible by ``every_steps``.
    The newest checkpoint is always kept. ``Keep()`` keeps everything.

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
        order = sorted(range(n), key=lambda i: checkpoints[i].step)
        if order:
            keep[order[-1]] = True
        if self.last is not None:
            for i in order[-self.last :]:
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


def metric_value(value: Any) -> float | None:
    """A meta value as a number to rank by, or None (missing, non-numeric, bool or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def as_policy(keep: Any) -> RetentionPolicy:
    if keep is None:
        return Keep()
    if isinstance(keep, RetentionPolicy):
        return keep
    raise TypeError(f"keep= needs a distckpt.Keep or an object with should_preserve(), got {keep!r}")
