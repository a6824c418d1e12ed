"""The background upload from the local tier to the primary one (``local_dir``).

With ``Checkpointer(url, local_dir=...)`` a save commits on node-local disk first (fast, and
the fastest to restore from), and the ``Uploader`` copies each locally committed step to the
job's URL in the background, committing it there only when every rank's files are up.

``Uploader`` call order for one step: (all ranks, in save order) ``submit``; (upload
thread, all ranks) each rank uploads the files it wrote; the ranks agree on the private
``"up"`` gloo group; (chief) the remote commit (manifest last, exclusive), then remote
retention; (node leaders) local retention, which never removes a step still to upload.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from . import retention
from .background import yield_to_training
from .errors import CheckpointError
from .layout.catalog import CheckpointInfo
from .layout.manifest import Manifest
from .layout.pointer import Pointers
from .layout.tier import Tier
from .log import log
from .ranks import Ranks
from .retention import Keep, RetentionPolicy
from .topology import Topology


class Uploader:
    """Copies locally committed steps to the remote tier on a thread of its own (see module doc)."""

    def __init__(
        self,
        ranks: Ranks,
        local: Tier,
        remote: Tier,
        *,
        topology: Topology,
        policy: RetentionPolicy,
        local_keep: int,
        check_lease: Callable[[], None],
        threads: int = 4,
        max_queued: int = 2,
        pointers: Pointers | None = None,
    ) -> None:
        self.ranks, self.local, self.remote, self.topology = ranks, local, remote, topology
        self.policy, self.local_keep, self.check_lease = policy, local_keep, check_lease
        self.threads, self.max_queued, self.pointers = threads, max_queued, pointers
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-upload", initializer=yield_to_training)
        self._lock = threading.Lock()
        self._futures: deque[tuple[int, Future]] = deque()
        self.pending: set[int] = set()  # steps committed locally, not yet on the remote tier

    def submit(self, manifest: Manifest, nonce: str) -> None:
        """(all ranks, in save order) Queue the upload of a locally committed step."""
        with self._lock:
            self.pending.add(manifest.step)
            queued = [f for _, f in self._futures if not f.done()]
        if len(queued) >= self.max_queued:
            log.info("uploads are behind: waiting for the oldest before queueing step %d", manifest.step)
            _wait_quietly(queued[0])
        future = self._executor.submit(self._upload, manifest, nonce)
        with self._lock:
            self._futures.append((manifest.step, future))

    def _upload(self, manifest: Manifest, nonce: str) -> CheckpointInfo | None:
        step = manifest.step
        workdir = self.remote.commit.workdir(step, nonce)
        try:
            self.ranks.agree(lambda: self._put_mine(manifest, workdir), f"uploading step {step}", on="up")
            infos = self.ranks.agree(
                lambda: self._commit(manifest, workdir), f"committing step {step} remotely", on="up"
            )
        except CheckpointError:
            if self.topology.owns(self.remote):
                self.remote.commit.abort(workdir)
            raise
        finally:
            with self._lock:
                self.pending.discard(step)
        if self.topology.owns(self.local):
            self.prune_local()
        log.info("step %d uploaded to %s", step, self.remote.storage.url)
        return infos[0]

    def _put_mine(self, manifest: Manifest, workdir: str) -> None:
        src = self.local.catalog.step_path(manifest.step)
        mine = [r.name for r in manifest.files.values() if r.rank == self.ranks.rank]
        self.remote.commit.create_workdir(workdir)
        with ThreadPoolExecutor(max(1, min(self.threads, len(mine)))) as pool:
            for f in [
                pool.submit(self.remote.storage.put_file, os.path.join(src, n), self.remote.storage.join(workdir, n))
                for n in mine
            ]:
                f.result()

    def _commit(self, manifest: Manifest, workdir: str) -> CheckpointInfo | None:
        if not self.topology.owns(self.remote):
            return None
        self.check_lease()
        self.remote.commit.finish(workdir, manifest)
        try:
            retention.apply(self.policy, self.remote.catalog, pointers=self.pointers)
        except Exception as e:  # noqa: BLE001 - retention never fails an upload
            log.warning("remote retention failed (%s); it will be retried", e)
        return self.remote.catalog.info(manifest)

    def busy(self) -> bool:
        """An upload is queued or running."""
        with self._lock:
            return bool(self.pending)

    def prune_local(self) -> None:
        """(node leaders) Keep the newest ``local_keep`` local steps and any still to upload."""
        with self._lock:
            pending = set(self.pending)
        try:
            retention.apply(
                Keep(last=self.local_keep), self.local.catalog, protect=lambda s: s in pending, recycle=True
            )
        except Exception as e:  # noqa: BLE001
            log.warning("local retention failed (%s); it will be retried", e)

    def check_errors(self) -> None:
        """Raise the oldest failed upload (once), without waiting; later failures stay queued
        for the next call, so none is lost."""
        err: BaseException | None = None
        with self._lock:
            left: deque[tuple[int, Future]] = deque()
            for s, f in self._futures:
                if err is None and f.done():
                    err = f.exception()
                    continue
                left.append((s, f))
            self._futures = left
        if err is not None:
            raise err

    def wait(self) -> None:
        """Block until every queued upload is committed remotely; raise a failure once."""
        with self._lock:
            futures = [f for _, f in self._futures]
        for f in futures:
            _wait_quietly(f)
        self.check_errors()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class Cadence:
    """Which locally committed saves also go to the remote tier: every ``every``-th, or with a
    ``timedelta`` the first one at least that long after the last that went (the chief's
    clock decides, for every rank); always the final save before a preemption exit
    (``force``) and a save no partner protects. The others stay in node memory; ``flush()``
    sends the newest of them (at ``close``). Called in save order on every rank."""

    def __init__(self, uploader: Uploader, ranks: Ranks, every: int | timedelta) -> None:
        self.uploader, self.ranks, self.every = uploader, ranks, every
        self.force = False  # set around the final save before a preemption exit
        self._since = 0  # saves not uploaded since the last upload
        self._last: float | None = None  # when a save last went (monotonic)
        self._held: tuple[Manifest, str] | None = None  # the newest save that stayed local

    def after_commit(self, manifest: Manifest, nonce: str, force: bool = False) -> None:
        """(all ranks, save thread, same decision) Upload ``manifest``'s step, or keep it local."""
        self._since += 1
        if self._due() or self.force or force:
            self._last = time.monotonic()
            self.uploader.submit(manifest, nonce)
            self._since, self._held = 0, None
        else:
            self._held = (manifest, nonce)

    def _due(self) -> bool:
        if not isinstance(self.every, timedelta):
            return self._since >= self.every
        due = self._last is None or time.monotonic() - self._last >= self.every.total_seconds()
        return bool(self.ranks.agree(lambda: due, "deciding whether to upload", on="bg")[0])

    def flush(self) -> None:
        """(all ranks, no save in flight) The newest save that stayed local goes remote too."""
        if self._held is not None:
            manifest, nonce = self._held
            self._held, self._since = None, 0
            self.uploader.submit(manifest, nonce)


def _wait_quietly(f: Future) -> None:
    try:
        f.result()
    except BaseException:  # noqa: BLE001 - reported by check_errors, once
        pass
