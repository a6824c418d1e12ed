"""Tiers: the places one job's checkpoints live, each a storage with its commit and catalog.

``primary`` is the job's URL (a shared filesystem or an object store: every rank sees every
file). With ``Checkpointer(url, local_dir=...)`` a ``local`` tier in front of it holds each
node's own files on node-local disk. ``Tiers`` keeps them fastest first; a restore reads a
step from the first tier that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..storage import Storage, open_storage
from .catalog import Catalog, CheckpointInfo
from .commit import Commit, commit_for


@dataclass
class Tier:
    """One place checkpoints live. ``shared``: every rank sees every file (a remote URL or a
    shared mount); a node-local tier holds only the files of its own node's ranks."""

    name: str
    storage: Storage
    commit: Commit
    catalog: Catalog
    shared: bool = True

    @classmethod
    def open(cls, name: str, url: str, options: dict[str, Any] | None, shared: bool) -> Tier:
        storage = open_storage(url, options)
        commit = commit_for(storage)
        return cls(name, storage, commit, Catalog(storage, commit), shared)


class Tiers:
    """A job's tiers, fastest first; the last is the primary (the job's URL)."""

    def __init__(self, tiers: list[Tier]) -> None:
        self.all = tiers
        self.by_name = {t.name: t for t in tiers}

    @property
    def primary(self) -> Tier:
        return self.all[-1]

    @property
    def first(self) -> Tier:
        """Where saves are written and committed first."""
        return self.all[0]

    def list(self) -> list[CheckpointInfo]:
        """Committed steps of every tier, oldest first; a step on several tiers is listed
        once, with the tier a restore would read it from."""
        merged: dict[int, CheckpointInfo] = {}
        for tier in reversed(self.all):  # earlier (faster) tiers win
            for info in tier.catalog.list():
                merged[info.step] = replace(info, tier=tier.name)
        return [merged[s] for s in sorted(merged)]

    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists on any tier, newest first (damaged ones included)."""
        return sorted({s for t in self.all for s in t.catalog.committed_steps()}, reverse=True)

    def holders(self, step: int) -> list[str]:
        """Names of the tiers where ``step`` is committed, fastest first."""
        return [t.name for t in self.all if t.catalog.is_committed(step)]

    def is_committed(self, step: int) -> bool:
        return any(t.catalog.is_committed(step) for t in self.all)
