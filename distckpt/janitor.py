"""What follows a commit on the tier's owner, on a thread of its own (``Janitor``):
retention (``retention.apply``; with a local tier, the uploader's pruning), the removal of
uncommitted leftovers, and the ``latest.json``/``best.json`` hints. Never raises: a failed
clean-up is logged and retried after the next save.

On a root that recycles (``layout/recycle.py``) the next save waits for it before writing
(``before_save``), so that the files retention kept are there for the save to take.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor

from . import retention
from .background import yield_to_training
from .layout import recycle
from .layout.pointer import Pointers
from .layout.tier import Tier, Tiers
from .log import log
from .retention import RetentionPolicy
from .upload import Uploader


class Janitor:
    """Post-commit work of one job's saves; ``active()`` names the work directories in flight."""

    def __init__(
        self,
        tiers: Tiers,
        policy: RetentionPolicy,
        active: Callable[[], Container[str]],
        uploader: Uploader | None = None,
        pointers: Pointers | None = None,
    ) -> None:
        self.tiers, self.policy, self.active = tiers, policy, active
        self.uploader, self.pointers = uploader, pointers
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distckpt-retention", initializer=yield_to_training)
        self._job: Future | None = None

    def after_commit(self, tier: Tier) -> None:
        """(the tier's owner) Queue retention and the removal of leftovers for ``tier``."""
        local = tier is self.tiers.first
        self._job = self._pool.submit(self._retain if local else self._retain_remote)

    def before_save(self, tier: Tier) -> None:
        """(the tier's owner, before a save's files are written) On a recycling root, let the
        last retention finish: it hands the deleted step's files to this save."""
        if recycle.enabled(tier.storage):
            self.settle()

    def settle(self) -> None:
        if self._job is not None:
            self._job.result()

    def close(self, owner: bool) -> None:
        self._pool.shutdown(wait=True)
        if owner:
            recycle.empty(self.tiers.first.storage)  # the pool's disk space back

    def _retain(self) -> None:
        tier = self.tiers.first
        try:
            if self.uploader is not None:
                self.uploader.prune_local()  # the primary's retention follows each upload
            else:
                retention.apply(self.policy, tier.catalog, pointers=self.pointers, recycle=True)
            tier.catalog.clean_leftovers(self.active)
        except Exception as e:  # noqa: BLE001 - a failed clean-up must not fail the save
            log.warning("retention after commit failed (%s); it will be retried after the next save", e)

    def _retain_remote(self) -> None:
        """After a save that went straight to the remote tier (the local one was full). No
        recycling there: the pool is emptied on the first tier only, at ``close``."""
        try:
            retention.apply(self.policy, self.tiers.primary.catalog, pointers=self.pointers)
        except Exception as e:  # noqa: BLE001 - a failed clean-up must not fail the save
            log.warning("remote retention failed (%s); it will be retried", e)


class OwnWork:
    """``path in work``: a registered work directory, or any carrying this job's nonce."""

    def __init__(self, active: set[str], marker: str) -> None:
        self.active, self.marker = active, marker

    def __contains__(self, path: object) -> bool:
        return path in self.active or (isinstance(path, str) and self.marker in os.path.basename(path))
