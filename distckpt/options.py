"""``Options``: every knob of a ``Checkpointer``, validated once, in one place.

The Checkpointer's keyword arguments become one frozen ``Options``; nothing downstream
re-checks them. See ``Checkpointer`` for what each one means.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .engine import ENGINES
from .preemption import Preemption, as_preemption
from .retention import RetentionPolicy, as_policy, best_ranking
from .schedule import as_save_policy
from .staging import STAGERS
from .step_guard import SNAPSHOTS


@dataclass(frozen=True, kw_only=True)
class Options:
    url: str
    mode: str = "sharded"
    async_save: bool = False
    keep: RetentionPolicy | None = None
    storage_options: dict[str, Any] | None = None
    local_dir: str | None = None
    local_keep: int = 2
    replicas: int = 1
    upload_every: int | timedelta = 1
    process_group: Any = None
    timeout: timedelta = timedelta(minutes=30)
    max_in_flight: int = 1
    write_threads: int = 4
    stager: Any = "auto"
    snapshot: str = "now"
    staging_budget: int | None = None
    read_only: bool = False
    preemption: Preemption | None = None
    save_policy: Any = None
    best: Any = None

    def __post_init__(self) -> None:
        if self.mode not in ENGINES:
            raise ValueError(f"mode must be 'sharded' or 'chief', got {self.mode!r}")
        if isinstance(self.timeout, (int, float)):
            object.__setattr__(self, "timeout", timedelta(seconds=self.timeout))
        if isinstance(self.upload_every, timedelta) and self.upload_every.total_seconds() <= 0:
            raise ValueError(f"upload_every must be an int >= 1 or a positive timedelta, got {self.upload_every!r}")
        for name in ("max_in_flight", "local_keep", "upload_every"):
            value = getattr(self, name)
            if name == "upload_every" and isinstance(value, timedelta):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, got {self.replicas!r}")
        if isinstance(self.stager, str) and self.stager not in STAGERS:
            raise ValueError(f"stager must be one of {STAGERS} or a Stager, got {self.stager!r}")
        if self.snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {SNAPSHOTS}, got {self.snapshot!r}")
        if self.snapshot == "overlap" and not self.async_save:
            raise ValueError("snapshot='overlap' needs async_save=True (a synchronous save blocks training anyway)")
        if self.staging_budget is not None and self.staging_budget < 0:
            raise ValueError(f"staging_budget must be a number of bytes >= 0, got {self.staging_budget!r}")
        object.__setattr__(self, "keep", as_policy(self.keep))
        object.__setattr__(self, "preemption", as_preemption(self.preemption))
        object.__setattr__(self, "save_policy", as_save_policy(self.save_policy))
        object.__setattr__(self, "best", best_ranking(self.best, self.policy))

    @property
    def policy(self) -> RetentionPolicy:
        assert self.keep is not None  # as_policy made it one
        return self.keep
