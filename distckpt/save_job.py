"""One save: its handle (``SaveHandle``, what ``save()`` returns), what the training thread
hands to the save thread (``SaveJob``), and the checks of what the user passes in."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout.catalog import CheckpointInfo
from .staging import HostStaged, Staged


class SaveHandle:
    """One save in flight. ``wait()`` returns its ``CheckpointInfo`` or raises its error."""

    def __init__(self, step: int, future: Future) -> None:
        self.step = step
        self._future = future
        self.reported = False

    def done(self) -> bool:
        return self._future.done()

    def failed(self) -> bool:
        return self._future.done() and self._future.exception() is not None

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        try:
            return self._future.result(timeout)
        except BaseException:
            self.reported = True
            raise

    def __repr__(self) -> str:
        state = "failed" if self.failed() else "done" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, {state})"


@dataclass
class SaveJob:
    """What the training thread hands to the save thread."""

    step: int
    meta: dict[str, Any]
    skeletons: dict[str, Any] = field(default_factory=dict)
    per_rank: dict[str, Any] = field(default_factory=dict)
    staged: Staged = field(default_factory=lambda: HostStaged({}))
    stall_s: float = 0.0
    stage_s: float = 0.0
    staging_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)
    error: Exception | None = None  # raised on every rank at the first agreement


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            step = int(step.__index__())
        except (AttributeError, TypeError):
            raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if not 0 <= step < 10**12:
        raise ValueError(f"step must be in [0, 1e12), got {step}")
    return step


def check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Meta must be JSON; 0-d tensors and numpy scalars are turned into numbers."""
    out = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"meta keys must be str, got {key!r}")
        if isinstance(value, torch.Tensor) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
            value = value.item()
        try:
            json.dumps(value, allow_nan=True)
        except TypeError as e:
            raise TypeError(f"meta[{key!r}] must be JSON-serialisable: {e}") from None
        out[key] = value
    return out
