"""The save pipeline behind ``Checkpointer.save`` (steps 3-5 of DESIGN.md's save path).

``Saver.run(job)`` runs on every rank, in save order, on the save thread (the caller's
thread for synchronous saves). Its collectives use the private ``"bg"`` gloo group, and
each one is an ``agree``: an error on any rank raises ``CheckpointError`` on all of them.
  1. prepare: (chief) the step must be new; (writing ranks) create the work directory.
  2. write: this rank's files through DCP, checksummed as written; results all-gathered.
  3. finish: (chief) ``state.json``, ``manifest.json``, lease check, atomic commit; with a
     multi-node local tier, (node leaders) the same commit on every node's local disk.
  4. after: the upload to the remote tier is queued (local tier), and retention runs on
     the janitor thread (never on the save path).
"""

from __future__ import annotations

import errno
import itertools
import json
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .dcp_io import DCP_METADATA
from .dist import RankContext
from .engine import Engine
from .errors import CheckpointError, CommitError, DistckptError
from .info import CheckpointInfo, SaveStats
from .lease import Lease
from .log import log
from .manifest import STATE_FILE, FileRecord, Manifest, checksum_bytes
from .retention import RetentionPolicy
from .staging import Staged, Stager
from .tiers import Nodes, Tier, Uploader


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
    step: int
    meta: dict[str, Any]
    skeletons: dict[str, Any]
    per_rank: dict[str, Any]
    staged: Staged
    stall_s: float = 0.0
    stage_s: float = 0.0
    staging_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)
    error: Exception | None = None


@dataclass
class Saver:
    ctx: RankContext
    engine: Engine
    stager: Stager
    tier: Tier  # where saves are written and committed first
    remote: Tier
    policy: RetentionPolicy
    nonce: str
    nodes: Nodes
    uploader: Uploader | None = None
    lease: Lease | None = None

    def __post_init__(self) -> None:
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.active: set[str] = set()
        self._janitor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-retention")
        self._janitor_job: Future | None = None

    def run(self, job: SaveJob) -> CheckpointInfo:
        """(all ranks, in save order) prepare, write, commit. Raises on every rank or none."""
        ctx, tier = self.ctx, self.tier
        nonce = f"{self.nonce}-{next(self._seq)}"
        workdir = tier.commit.workdir(job.step, nonce)
        with self._lock:
            self.active.add(workdir)
        try:
            ctx.agree(lambda: self._prepare(job, workdir), f"preparing step {job.step}", on="bg")
            t_write = time.perf_counter()
            results = ctx.agree(lambda: self._write(job, workdir), f"writing step {job.step}", on="bg")
            t_commit = time.perf_counter()
            docs = ctx.agree(lambda: self._finish(job, workdir, results), f"committing step {job.step}", on="bg")
            manifest_json, state_json, metadata = docs[0]
            if self.nodes.count > 1 and not tier.shared:
                ctx.agree(
                    lambda: self._commit_node_copy(workdir, manifest_json, state_json, metadata),
                    f"committing step {job.step} on every node",
                    on="bg",
                )
        except CheckpointError as e:
            if ctx.is_chief or (self.nodes.leader and not tier.shared):
                tier.commit.abort(workdir)
            self._raise_if_fenced(e)
            raise
        finally:
            self.stager.release(job.staged)
            with self._lock:
                self.active.discard(workdir)
        manifest = Manifest.from_json(manifest_json, "the manifest just written")
        info = replace(tier.catalog.info(manifest), stats=self._stats(job, t_write, t_commit, results), tier=tier.name)
        self._log(info)
        if self.uploader is not None:
            self.uploader.submit(manifest, nonce)
        if ctx.is_chief or (self.nodes.leader and not tier.shared):
            self._janitor_job = self._janitor.submit(self._retain)
        return info

    def _raise_if_fenced(self, err: CheckpointError) -> None:
        """(chief) A failed save in a root another job has taken over fails for that reason:
        the new holder removes this job's unfinished work, so say so rather than report the
        missing files."""
        if self.lease is None or any(isinstance(e, CommitError) for e in err.errors.values()):
            return
        try:
            self.lease.check()
        except CommitError as fenced:
            raise CheckpointError(err.message, {self.ctx.rank: fenced}) from err
        except OSError:
            pass

    def _prepare(self, job: SaveJob, workdir: str) -> None:
        if job.error is not None:
            raise job.error
        if self.ctx.is_chief:
            for tier in {id(self.tier): self.tier, id(self.remote): self.remote}.values():
                if tier.catalog.is_committed(job.step):
                    raise DistckptError(
                        f"step {job.step} is already committed in {tier.storage.url}; save under a new step number or delete it first"
                    )
        if self.engine.writes(self.ctx) or (self.nodes.leader and not self.tier.shared):
            self.tier.storage.makedirs(workdir)

    def _write(self, job: SaveJob, workdir: str) -> tuple[list[FileRecord], dict[str, Any], dict[str, Any]]:
        tensors = self.stager.materialize(job.staged)
        try:
            records, table = self.engine.write(tensors, workdir, self.tier.storage, self.ctx)
        except (CheckpointError, OSError) as e:
            explained = explain_storage_error(e, self.tier.storage.url, job.step)
            if explained is e:
                raise
            raise explained from e
        return records, table, job.per_rank

    def _finish(self, job: SaveJob, workdir: str, results: list[Any]) -> tuple[bytes, bytes, bytes | None] | None:
        if not self.ctx.is_chief:
            return None
        storage = self.tier.storage
        state = {
            "recoverables": job.skeletons,
            "per_rank": {name: [r[2].get(name) for r in results] for name in job.per_rank},
            "tensors": results[0][1],
            # staged copies are contiguous, which lets restore read raw bytes in place
            "layout": "any" if job.staged.live else "contiguous",
        }
        data = json.dumps(state, allow_nan=True).encode()
        storage.write_bytes(storage.join(workdir, STATE_FILE), data)
        files = {rec.name: rec for records, _, _ in results for rec in records}
        files[STATE_FILE] = FileRecord(STATE_FILE, len(data), checksum_bytes(data), 0)
        manifest = Manifest(
            step=job.step, world_size=self.ctx.world_size, mode=self.engine.mode, files=files, meta=job.meta
        )
        if self.lease is not None:
            self.lease.check()  # fencing: never commit into a root another job has taken
        metadata = None
        if self.nodes.count > 1 and not self.tier.shared:  # other nodes' local tiers need a copy
            metadata = storage.read_bytes(storage.join(workdir, DCP_METADATA))
        self.tier.commit.finish(workdir, manifest)
        return manifest.to_json(), data, metadata

    def _commit_node_copy(self, workdir: str, manifest_json: bytes, state_json: bytes, metadata: bytes | None) -> None:
        """(node leaders other than the chief's) commit this node's share of the step locally."""
        if not self.nodes.leader or self.nodes.chief_node:
            return
        storage = self.tier.storage
        storage.write_bytes(storage.join(workdir, STATE_FILE), state_json)
        if metadata is not None:
            storage.write_bytes(storage.join(workdir, DCP_METADATA), metadata)
        self.tier.commit.finish(workdir, Manifest.from_json(manifest_json, "the chief's manifest"))

    def _stats(self, job: SaveJob, t_write: float, t_commit: float, results: list[Any]) -> SaveStats:
        end = time.perf_counter()
        return SaveStats(
            stall_s=job.stall_s,
            stage_s=job.stage_s,
            write_s=t_commit - t_write,
            commit_s=end - t_commit,
            total_s=end - job.started,
            bytes_written=sum(r.size for r in results[self.ctx.rank][0]),
            staging_bytes=job.staging_bytes,
        )

    def _log(self, info: CheckpointInfo) -> None:
        s = info.stats
        assert s is not None
        log.info(
            "step %d committed (%s): stall %.3fs, write %.3fs (%.2f GB/s), commit %.3fs, %d bytes on this rank",
            info.step,
            info.tier,
            s.stall_s,
            s.write_s,
            s.write_gbps,
            s.commit_s,
            s.bytes_written,
        )

    def _retain(self) -> None:
        """(chief / node leaders, after a commit) retention and leftovers; never raises."""
        try:
            if self.uploader is not None:
                self.uploader.prune_local()  # remote retention follows each remote commit
            else:
                self.tier.catalog.apply_retention(self.policy)
            self.tier.catalog.clean_leftovers(self._active_now)
        except Exception as e:  # noqa: BLE001 - a failed clean-up must not fail the save
            log.warning("retention after commit failed (%s); it will be retried after the next save", e)

    def _active_now(self) -> set[str]:
        with self._lock:
            return set(self.active)

    def settle(self) -> None:
        """Let the retention that follows the last commit finish (it never raises)."""
        job = self._janitor_job
        if job is not None:
            job.result()

    def close(self) -> None:
        self._janitor.shutdown(wait=True)


def explain_storage_error(err: BaseException, url: str, step: int) -> BaseException:
    """Say what a low-level storage error means for the user, and what to do."""
    causes = list(getattr(err, "errors", {}).values()) or [err]
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return DistckptError(
                f"no space left where {url} lives while writing step {step} ({cause}); free space or keep "
                "fewer checkpoints (keep=distckpt.Keep(last=...)); earlier committed steps are intact"
            )
    return err


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
