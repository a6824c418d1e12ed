"""The save path, top to bottom (README, "How it works"). ``Saves`` is a Checkpointer's save side.

``save(step, meta)``, on the training thread of every rank, in the same order:
  1. wait: if ``max_in_flight`` saves are pending, wait for the oldest; re-raise an
     earlier save's (or upload's) error, once.
  2. stage: the recoverables' states are split into a JSON skeleton and tensors, and the
     tensors are copied by the stager - the only part that blocks training.
Then ``_run(job)`` on the save thread (``async_save``) or right away. Every phase is an
``agree`` on the private ``"bg"`` gloo group: an error on any rank raises
``CheckpointError`` on all of them, and the step is aborted, never half-committed.
  3. prepare: (chief) the step must be new on every tier; the work directory is created.
  4. write: (all ranks) this rank's files through DCP, checksummed as written; the file
     records and per-rank states are all-gathered.
  5. commit: (chief) ``state.json``, ``manifest.json``, lease check, atomic commit; with a
     multi-node local tier, (node leaders) the same commit on each node's disk. Then the
     upload to the primary tier is queued (local tier) and retention runs on the janitor
     thread, never on the save path.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Container, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from .background import yield_to_training
from .dcp import DCP_METADATA
from .engine import Engine
from .errors import CheckpointError, CommitError, DistckptError, explain_storage_error, out_of_space
from .gc_paused import gc_paused
from .janitor import Janitor, OwnWork
from .layout.catalog import CheckpointInfo, SaveStats, encode_state
from .layout.lease import Lease
from .layout.manifest import STATE_FILE, FileRecord, Manifest, checksum_bytes
from .layout.pointer import Pointers
from .layout.tier import Tier, Tiers
from .log import log
from .ranks import Ranks
from .recoverables import Recoverables
from .replicas import Replicator
from .retention import RetentionPolicy
from .save_job import SaveHandle, SaveJob, check_meta, check_step
from .staging import HostStaged, Staged, Stager
from .step_guard import StepGuard
from .topology import Topology
from .upload import Cadence, Uploader


@dataclass
class Saves:
    ranks: Ranks
    topology: Topology
    engine: Engine
    stager: Stager
    tiers: Tiers
    recoverables: Recoverables
    policy: RetentionPolicy
    nonce: str  # the chief's, agreed at open: work directories never collide between jobs
    async_save: bool = False
    max_in_flight: int = 1
    uploader: Uploader | None = None
    lease: Lease | None = None
    pointers: Pointers | None = None  # latest.json / best.json, when saves commit on the primary
    replicator: Replicator | None = None  # copies of each node's local step on partner nodes
    upload_every: int | timedelta = 1  # with a local tier: every k-th save (or interval) also goes remote
    guard: StepGuard | None = None  # snapshot="overlap": optimizer steps wait for the deferred copy

    def __post_init__(self) -> None:
        self.tier = self.tiers.first  # where saves are written and committed first
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._encoded: dict[str, tuple[Any, str]] = {}  # the tensor table and DCP index as JSON (encode_state)
        self._pending: deque[SaveHandle] = deque()
        self._executor = None
        if self.async_save:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-save", initializer=yield_to_training)
            self._executor.submit(int)  # its thread starts now, not in the first save's stall
        self.active: set[str] = set()  # work directories of saves in flight (never "leftovers")
        self.janitor = Janitor(self.tiers, self.policy, self._active_now, self.uploader, self.pointers)
        # with a local tier: which saves also go to the remote tier
        self.cadence = Cadence(self.uploader, self.ranks, self.upload_every) if self.uploader is not None else None

    # --- 1 + 2: on the training thread ----------------------------------------------------

    def save(self, step: int, meta: Mapping[str, Any] | None, end_of_epoch: bool | None = None) -> SaveHandle:
        t0 = time.perf_counter()
        step, meta = check_step(step), check_meta(meta)
        if end_of_epoch is not None:
            meta["end_of_epoch"] = bool(end_of_epoch)
        self._drain(self.max_in_flight - 1)
        try:
            job = self._snapshot(step, meta, t0)
        except Exception as e:  # noqa: BLE001 - other ranks are heading into collectives:
            job = SaveJob(step, meta, error=e)  # carry the error so that every rank raises it together
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(self._run(job))
            except BaseException as e:
                future.set_exception(e)
            handle = SaveHandle(step, future)
            handle.wait()  # a sync save raises right here, on every rank
            return handle
        handle = SaveHandle(step, self._executor.submit(self._run, job))
        with self._lock:
            self._pending.append(handle)
        if job.staged.live:  # nothing was copied: the tensors must be written before we return
            self._drain(0)
        return handle

    def _drain(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` saves are pending; raise the first unreported error."""
        error: BaseException | None = None
        while True:
            with self._lock:
                if len(self._pending) <= keep:
                    break
                handle = self._pending.popleft()
            already_reported = handle.reported
            try:
                handle.wait()
            except BaseException as e:
                if not already_reported and error is None:
                    error = e
        if error is not None:
            raise error
        if self.uploader is not None:
            self.uploader.check_errors()

    def _snapshot(self, step: int, meta: dict[str, Any], t0: float) -> SaveJob:
        with gc_paused():  # a few objects per tensor: no collector passes over the model while training waits
            skeletons, per_rank, tensors = self.recoverables.snapshot(self.engine.full_state)
            t_stage = time.perf_counter()
            staged = self._stage(tensors) if self.engine.writes(self.ranks) else HostStaged({})
        now = time.perf_counter()
        return SaveJob(step, meta, skeletons, per_rank, staged, now - t0, now - t_stage, self.stager.capacity, t0)

    def _stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        """The copy; under ``snapshot="overlap"`` the optimizers' part of it follows, and
        their next step waits for it (``step_guard.py``)."""
        if self.guard is None or not (later := self.guard.later(tensors)):
            return self.stager.stage(tensors)
        staged = self.stager.stage(tensors, later=later)
        if isinstance(staged, HostStaged) and staged.ready is not None:
            self.guard.hold(staged)
        return staged

    # --- 3-5: on the save thread -----------------------------------------------------------

    def _run(self, job: SaveJob) -> CheckpointInfo:
        """(all ranks, in save order) prepare, write, commit. Raises on every rank or none.
        A save that does not fit in the local tier (node memory or local disk full on some
        node) goes straight to the remote tier instead: the job keeps its saves."""
        try:
            try:
                return self._save_to(self.tier, job)
            except _DidNotFit as e:
                remote = self.tiers.primary
                log.error(
                    "step %d does not fit in the local tier %s (%s); it is written straight to %s instead. "
                    "Free space there, or lower local_keep / the replicas it holds",
                    job.step,
                    self.tier.storage.url,
                    e.__cause__,
                    remote.storage.url,
                )
                return self._save_to(remote, job)
        finally:
            job.staged.release()

    def _save_to(self, tier: Tier, job: SaveJob) -> CheckpointInfo:
        ranks, what = self.ranks, f"step {job.step}"
        nonce = f"{self.nonce}-{next(self._seq)}"
        workdir = tier.commit.workdir(job.step, nonce)
        with self._lock:
            self.active.add(workdir)
        try:
            ranks.agree(lambda: self._prepare(tier, job, workdir), f"preparing {what}", on="bg")
            t_write = time.perf_counter()
            results = ranks.agree(lambda: self._write(tier, job, workdir), f"writing {what}", on="bg")
            t_commit = time.perf_counter()
            docs = ranks.agree(lambda: self._commit(tier, job, workdir, results), f"committing {what}", on="bg")[0]
            if self.topology.replicates_commit(tier):
                ranks.agree(
                    lambda: self._commit_node_copy(tier, workdir, *docs), f"committing {what} on every node", on="bg"
                )
        except CheckpointError as e:
            if self.topology.owns(tier):
                tier.commit.abort(workdir)
            self._raise_if_fenced(e)
            err = e
            if tier is self.tier and self.uploader is not None:  # the remote tier can take it instead
                if any(ranks.agree(lambda: out_of_space(err), f"deciding where {what} goes", on="bg")):
                    raise _DidNotFit(str(e)) from e
            raise
        finally:
            with self._lock:
                self.active.discard(workdir)
        manifest = Manifest.from_json(docs[0], "the manifest just written")
        stats = self._stats(job, t_write, t_commit, results)
        info = replace(tier.catalog.info(manifest), stats=stats, tier=tier.name)
        _log_commit(info, stats)
        if tier is not self.tier:  # straight to the remote tier: nothing to protect or upload
            if self.topology.owns(tier):
                self.janitor.after_commit(tier)
            return info
        unprotected = self._protect(job.step)
        if self.cadence is not None:  # the remote tier gets its saves even when one is unprotected
            self.cadence.after_commit(manifest, nonce, force=unprotected is not None)
        if self.topology.owns(tier):
            self.janitor.after_commit(tier)
        if unprotected is not None:
            raise unprotected
        return info

    def flush_remote(self) -> None:
        """(all ranks, at close) The newest save that stayed in node memory goes remote too."""
        self._drain(0)
        if self.cadence is not None:
            self.cadence.flush()

    def _protect(self, step: int) -> CheckpointError | None:
        """(all ranks, after every node committed its copy) the node copies onto partner
        nodes (``replicas.py``); the error, when that failed on any rank."""
        rep = self.replicator
        if rep is None or not rep.active:
            return None
        rep.settle()  # a refill after a restore uses the same group
        t0 = time.perf_counter()
        try:
            self.ranks.agree(lambda: rep.replicate(step, self.ranks.group("rep")), f"replicating step {step}", on="bg")
        except CheckpointError as e:
            log.error("step %d is committed on every node but not protected by a replica: %s", step, e)
            return e
        log.info("step %d protected: a copy of every node's files on %d partner node(s) in %.3fs", step,
                 rep.replicas, time.perf_counter() - t0)  # fmt: skip
        return None

    def _prepare(self, tier: Tier, job: SaveJob, workdir: str) -> None:
        if job.error is not None:
            raise job.error
        if self.topology.owns(tier):
            self.janitor.before_save(tier)  # before the agree: every rank finds the files it keeps
        if self.ranks.is_chief:  # a save sent on to the remote tier may be committed on a node that had room
            for where in self.tiers.all if tier is self.tier else [tier]:
                if where.catalog.is_committed(job.step):
                    raise DistckptError(
                        f"step {job.step} is already committed in {where.storage.url}; save under a new step "
                        "number or delete it first"
                    )
        if self.topology.prepares(tier, self.engine.writes(self.ranks)):
            tier.commit.create_workdir(workdir)

    def _write(self, tier: Tier, job: SaveJob, workdir: str) -> tuple[list[FileRecord], dict[str, Any], dict[str, Any]]:
        tensors = job.staged.materialize()
        try:
            records, table = self.engine.write(tensors, workdir, tier.storage, self.ranks)
        except (CheckpointError, OSError) as e:
            explained = explain_storage_error(e, tier.storage.url, job.step)
            if explained is e:
                raise
            raise explained from e
        return records, table, job.per_rank

    def _commit(
        self, tier: Tier, job: SaveJob, workdir: str, results: list[Any]
    ) -> tuple[bytes, bytes, bytes | None] | None:
        """(chief) ``state.json`` and the manifest, then the atomic commit."""
        if not self.ranks.is_chief:
            return None
        storage = tier.storage
        state = {
            "recoverables": job.skeletons,
            "per_rank": {name: [r[2].get(name) for r in results] for name in job.per_rank},
            # every item is written as plain row-major data (dcp/writer.py): restore reads it raw
            "layout": "contiguous",
        }
        with gc_paused():  # the encoder makes a tuple per dict entry: no collector passes over the state
            data = encode_state(state, results[0][1], self._encoded)  # + the tensor table and DCP's index
        storage.write_bytes(storage.join(workdir, STATE_FILE), data)
        files = {rec.name: rec for records, _, _ in results for rec in records}
        files[STATE_FILE] = FileRecord(STATE_FILE, len(data), checksum_bytes(data), 0)
        manifest = Manifest(
            step=job.step,
            world_size=self.ranks.world_size,
            mode=self.engine.mode,
            files=files,
            meta=job.meta,
            placement=self.replicator.placement() if self.replicator is not None and tier is self.tier else None,
        )
        if self.lease is not None:
            self.lease.check()  # fencing: never commit into a root another job has taken
        metadata = None
        if self.topology.replicates_commit(tier):  # other nodes' local tiers need a copy
            metadata = storage.read_bytes(storage.join(workdir, DCP_METADATA))
        tier.commit.finish(workdir, manifest)
        return manifest.to_json(), data, metadata

    def _commit_node_copy(
        self, tier: Tier, workdir: str, manifest_json: bytes, state_json: bytes, metadata: bytes | None
    ) -> None:
        """(node leaders other than the chief's) commit this node's share of the step locally."""
        if not self.topology.commits_node_copy(tier):
            return
        storage = tier.storage
        storage.write_bytes(storage.join(workdir, STATE_FILE), state_json)
        if metadata is not None:
            storage.write_bytes(storage.join(workdir, DCP_METADATA), metadata)
        tier.commit.finish(workdir, Manifest.from_json(manifest_json, "the chief's manifest"))

    def _raise_if_fenced(self, err: CheckpointError) -> None:
        """(chief) A failed save in a root another job has taken over fails for that reason:
        the new holder removes this job's unfinished work, so say so rather than report the
        missing files."""
        if self.lease is None or any(isinstance(e, CommitError) for e in err.errors.values()):
            return
        try:
            self.lease.check()
        except CommitError as fenced:
            raise CheckpointError(err.message, {self.ranks.rank: fenced}) from err
        except OSError:
            pass

    def _stats(self, job: SaveJob, t_write: float, t_commit: float, results: list[Any]) -> SaveStats:
        end = time.perf_counter()
        return SaveStats(
            stall_s=job.stall_s,
            stage_s=job.stage_s,
            write_s=t_commit - t_write,
            commit_s=end - t_commit,
            total_s=end - job.started,
            bytes_written=sum(r.size for r in results[self.ranks.rank][0]),
            staging_bytes=job.staging_bytes,
            held_s=getattr(job.staged, "held", 0.0),
        )

    def _active_now(self) -> Container[str]:
        """Work directories that are not leftovers: this job's own (its nonce in the name).
        Another rank of the node may create the next save's directory before this rank has
        registered it; a failed save of this job removes its own work (``abort``)."""
        with self._lock:
            active = set(self.active)
        return OwnWork(active, f"-{self.nonce}-")

    def final_save(self, step: int, meta: Mapping[str, Any] | None) -> tuple[bool, bool]:
        """(all ranks) The save before a preemption exit: wait for saves in flight (their
        error is logged: it was an earlier step's), then save ``step`` and wait for its
        commit unless the chief finds it committed. Returns ``(saved, already_committed)``;
        a failure is logged, never raised: the job exits for its restart regardless."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the final save matters more
            log.error("preemption: an earlier save failed (%s); making the final save anyway", e)
        step = check_step(step)
        done = self.ranks.agree(lambda: self.ranks.is_chief and self.tiers.is_committed(step), f"checking step {step}")
        if done[0]:
            return False, True
        try:
            if self.cadence is not None:
                self.cadence.force = True  # the job may come back on other nodes: memory would be gone
            try:
                self.save(step, meta).wait()
            finally:
                if self.cadence is not None:
                    self.cadence.force = False
            return True, False
        except Exception as e:  # noqa: BLE001
            log.error("preemption: the final save of step %d failed (%s); the job resumes from an older step", step, e)
            return False, False

    def busy(self) -> bool:
        """A save, or its upload, is still in flight (not durable yet)."""
        with self._lock:
            if any(not h.done() for h in self._pending):
                return True
        return self.uploader is not None and self.uploader.busy()

    def wait(self) -> None:
        """Every pending save committed (and uploaded); a failure raised once."""
        self._drain(0)
        if self.uploader is not None:
            self.uploader.wait()
        self.settle()

    def settle(self) -> None:
        """Let the retention that follows the last commit, and the refill of node memory that
        follows a restore, finish (neither raises)."""
        self.janitor.settle()
        if self.replicator is not None:
            self.replicator.settle()

    def close(self) -> None:
        """After ``wait``: stop the threads and free the staging memory."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.uploader is not None:
            self.uploader.close()
        self.janitor.close(owner=self.topology.owns(self.tier))
        self.engine.plans.forget()  # it holds the staging views: the pool's memory goes with them
        if self.guard is not None:
            self.guard.close()
        self.stager.close()


def _log_commit(info: CheckpointInfo, s: SaveStats) -> None:
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


class _DidNotFit(Exception):
    """A save failed for lack of space on the local tier (on some node), before its commit."""
