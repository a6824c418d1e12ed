"""What a committed checkpoint looks like to users, and what a save cost."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SaveStats:
    """Where the time of one save went (seconds) and how much it moved.

    ``stall_s`` is what the training loop waited for inside ``save()``;
    ``stage_s`` the device-to-host copy within it; ``write_s`` this rank's file writes;
    ``commit_s`` the cross-rank gather plus manifest and atomic commit.
    """

    stall_s: float = 0.0
    stage_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0
    bytes_written: int = 0
    staging_bytes: int = 0

    @property
    def write_gbps(self) -> float:
        """This rank's write throughput in GB/s (1e9 bytes)."""
        return self.bytes_written / self.write_s / 1e9 if self.write_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dataclasses.asdict(self)
        out["write_gbps"] = self.write_gbps
        return out


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint: read from its manifest, never from a directory name alone."""

    step: int
    url: str
    meta: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    world_size: int = 1
    mode: str = "sharded"
    nbytes: int = 0
    stats: SaveStats | None = None
    tier: str = "primary"

    def __repr__(self) -> str:
        return (
            f"CheckpointInfo(step={self.step}, url={self.url!r}, mode={self.mode!r}, "
            f"world_size={self.world_size}, nbytes={self.nbytes}, meta={self.meta!r})"
        )
