"""``Checkpointer``: the one object every rank of a training job creates and calls.

The save path (see DESIGN.md):
  1. (all ranks) wait for the previous save if too many are in flight; re-raise its error once.
  2. (all ranks) snapshot: recoverables' states are split into a JSON skeleton and tensors,
     and the tensors are staged (copied) - the only part that blocks training.
  3. (background thread when ``async_save``, all ranks) write this rank's files through DCP,
     checksumming as they are written.
  4. (background) gather per-rank results on a private gloo group; a failure on any rank
     becomes ``CheckpointError`` on every rank.
  5. (chief) write ``state.json`` and ``manifest.json``, commit atomically, then apply retention.
"""

from __future__ import annotations

import atexit
import itertools
import json
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import MappingProxyType
from typing import Any, NoReturn

import torch

from .catalog import Catalog
from .commit import commit_for
from .dist import RankContext
from .engine import make_engine
from .errors import CheckpointError, DistckptError
from .info import CheckpointInfo, SaveStats
from .log import log
from .manifest import STATE_FILE, FileRecord, Manifest, checksum_bytes
from .preemption import Preemption, as_preemption, final_save_and_exit
from .recoverables import Adapter, link_optimizers, make_adapter
from .restoring import Restorer
from .retention import RetentionPolicy, as_policy
from .staging import HostCopyStager, Stager
from .storage import open_storage
from .tree import split


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
class _Job:
    step: int
    meta: dict[str, Any]
    skeletons: dict[str, Any]
    per_rank: dict[str, Any]
    staged: dict[str, torch.Tensor]
    stall_s: float = 0.0
    stage_s: float = 0.0
    staging_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)
    error: Exception | None = None


class Checkpointer:
    """Save and restore a training job's state, on every rank, consistently.

    ``url``: a directory (local, NFS) or fsspec URL (``s3://bucket/run``).
    ``recoverables``: ``{name: obj}`` (modules, optimizers, schedulers, any ``Stateful``,
    tensors, dicts, JSON values). ``mode``: ``"sharded"`` (every rank writes its shards) or
    ``"chief"`` (rank 0 writes the full state). ``keep``: a ``Keep`` or ``RetentionPolicy``.
    ``async_save``: return from ``save()`` once tensors are staged; ``max_in_flight`` saves
    may be pending. ``preemption``: ``True`` or a ``Preemption`` installs SIGTERM/SIGUSR1
    handlers (from the main thread) for ``should_stop``/``save_and_exit``.
    Constructing it is a collective: every rank must do it, in the same order.
    """

    def __init__(
        self,
        url: str,
        recoverables: Mapping[str, Any] | None = None,
        *,
        mode: str = "sharded",
        async_save: bool = False,
        keep: Any = None,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        timeout: timedelta | float = timedelta(minutes=30),
        max_in_flight: int = 1,
        write_threads: int = 4,
        stager: Stager | None = None,
        preemption: bool | Preemption | None = None,
    ) -> None:
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._engine = make_engine(mode, write_threads)
        self._policy: RetentionPolicy = as_policy(keep)
        self._storage = open_storage(url, storage_options)
        self._commit = commit_for(self._storage)
        self._catalog = Catalog(self._storage, self._commit)
        self._ctx = RankContext(process_group, timeout)
        self._stager: Stager = stager or HostCopyStager()
        self._hooks: dict[type, Any] = {}
        self._adapters: dict[str, Adapter] = {}
        self.add_recoverables(recoverables or {})
        self._max_in_flight = max_in_flight
        self._pending: deque[SaveHandle] = deque()
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-save") if async_save else None
        self._closed = False
        self._nonce = self._ctx.agree(self._open_root, f"opening {url}")[0]
        self._restorer = Restorer(self._ctx, self._storage, self._catalog, self._engine)
        if async_save:
            atexit.register(_flush_at_exit, weakref.ref(self))
        self._preemption = as_preemption(preemption)
        if self._preemption is not None:
            self._preemption.install()

    # --- recoverables ---------------------------------------------------------------

    def add_recoverable(self, name: str, obj: Any) -> None:
        """Add (or replace) one recoverable under ``name``."""
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ValueError(f"recoverable names must be non-empty strings without '.' or '/', got {name!r}")
        self._adapters[name] = make_adapter(obj, self._hooks)
        link_optimizers(self._adapters)

    def add_recoverables(self, recoverables: Mapping[str, Any]) -> None:
        for name, obj in recoverables.items():
            self.add_recoverable(name, obj)

    def register_hooks(self, cls: type, *, save: Callable[[Any], Any], load: Callable[[Any, Any], None]) -> None:
        """Like ``distckpt.register_hooks`` but for this Checkpointer only."""
        self._hooks[cls] = (save, load)
        for name, adapter in list(self._adapters.items()):
            if isinstance(adapter.value, cls):
                self.add_recoverable(name, adapter.value)

    @property
    def recoverables(self) -> Mapping[str, Any]:
        """Current objects by name; plain values show what the last restore put there."""
        return MappingProxyType({n: a.value for n, a in self._adapters.items()})

    @property
    def rank(self) -> int:
        return self._ctx.rank

    @property
    def world_size(self) -> int:
        return self._ctx.world_size

    @property
    def url(self) -> str:
        return self._storage.url

    # --- saving ---------------------------------------------------------------------

    def save(self, step: int, meta: Mapping[str, Any] | None = None) -> SaveHandle:
        """Snapshot every recoverable as ``step`` and commit it (in the background with
        ``async_save``). Returns once tensors are staged; the caller may then change them.
        Raises the error of an earlier failed save, once."""
        self._check_open()
        t0 = time.perf_counter()
        step, meta = _check_step(step), _check_meta(meta)
        self._drain(self._max_in_flight - 1)
        try:
            job = self._snapshot(step, meta, t0)
        except Exception as e:  # noqa: BLE001 - other ranks are heading into collectives:
            # carry the error into the job so that every rank raises it together.
            job = _Job(step, meta, {}, {}, {}, error=e)
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
        return handle

    def _snapshot(self, step: int, meta: dict[str, Any], t0: float) -> _Job:
        full = self._engine.full_state
        skeletons, per_rank, tensors = {}, {}, {}
        for name, adapter in self._adapters.items():
            state = adapter.state(full)
            if adapter.per_rank:
                per_rank[name] = split(state, name, inline=True)[0]
                continue
            skeletons[name], found = split(state, name)
            if tensors.keys() & found.keys():
                raise ValueError(f"recoverable {name!r} has tensor names that clash with another's")
            tensors.update(found)
        t_stage = time.perf_counter()
        staged = self._stager.stage(tensors) if self._engine.writes(self._ctx) else {}
        now = time.perf_counter()
        nbytes = sum(t.numel() * t.element_size() for t in staged.values())
        return _Job(step, meta, skeletons, per_rank, staged, now - t0, now - t_stage, nbytes, started=t0)

    def _run(self, job: _Job) -> CheckpointInfo:
        """(all ranks, in save order) write, gather, commit. Raises on every rank or none."""
        ctx = self._ctx
        workdir = self._commit.workdir(job.step, f"{self._nonce}-{next(self._seq)}")
        with self._lock:
            self._active.add(workdir)
        try:
            ctx.agree(lambda: self._prepare(job, workdir), f"preparing step {job.step}", bg=True)
            t_write = time.perf_counter()
            results = ctx.agree(lambda: self._write(job, workdir), f"writing step {job.step}", bg=True)
            t_commit = time.perf_counter()
            infos = ctx.agree(lambda: self._finish(job, workdir, results), f"committing step {job.step}", bg=True)
        except CheckpointError:
            if ctx.is_chief:
                self._commit.abort(workdir)
            raise
        finally:
            self._stager.release(job.staged)
            with self._lock:
                self._active.discard(workdir)
        end = time.perf_counter()
        stats = SaveStats(
            stall_s=job.stall_s,
            stage_s=job.stage_s,
            write_s=t_commit - t_write,
            commit_s=end - t_commit,
            total_s=end - job.started,
            bytes_written=sum(r.size for r in results[ctx.rank][0]),
            staging_bytes=job.staging_bytes,
        )
        info = replace(infos[0], stats=stats)
        log.info(
            "step %d committed: stall %.3fs, write %.3fs (%.2f GB/s), commit %.3fs, %d bytes on this rank",
            job.step,
            stats.stall_s,
            stats.write_s,
            stats.write_gbps,
            stats.commit_s,
            stats.bytes_written,
        )
        if ctx.is_chief:
            self._retain()
        return info

    def _prepare(self, job: _Job, workdir: str) -> None:
        if job.error is not None:
            raise job.error
        step = job.step
        if self._ctx.is_chief and self._catalog.is_committed(step):
            raise DistckptError(f"step {step} is already committed; save under a new step number or delete it first")
        if self._engine.writes(self._ctx):
            self._storage.makedirs(workdir)

    def _write(self, job: _Job, workdir: str) -> tuple[list[FileRecord], dict[str, Any], dict[str, Any]]:
        records, table = self._engine.write(job.staged, workdir, self._storage, self._ctx)
        return records, table, job.per_rank

    def _finish(self, job: _Job, workdir: str, results: list[Any]) -> CheckpointInfo | None:
        if not self._ctx.is_chief:
            return None
        state = {
            "recoverables": job.skeletons,
            "per_rank": {name: [r[2].get(name) for r in results] for name in job.per_rank},
            "tensors": results[0][1],
        }
        data = json.dumps(state, allow_nan=True).encode()
        self._storage.write_bytes(self._storage.join(workdir, STATE_FILE), data)
        files = {rec.name: rec for records, _, _ in results for rec in records}
        files[STATE_FILE] = FileRecord(STATE_FILE, len(data), checksum_bytes(data), 0)
        manifest = Manifest(
            step=job.step, world_size=self._ctx.world_size, mode=self._engine.mode, files=files, meta=job.meta
        )
        self._commit.finish(workdir, manifest)
        return self._catalog.info(manifest)

    def _retain(self) -> None:
        """(chief, after a commit) apply retention and clear leftovers; never raises."""
        try:
            self._catalog.apply_retention(self._policy)
            with self._lock:
                active = set(self._active)
            self._catalog.clean_leftovers(active)
        except Exception as e:  # noqa: BLE001 - a failed clean-up must not fail the save
            log.warning("retention after commit failed (%s); it will be retried after the next save", e)

    def _open_root(self) -> str | None:
        if not self._ctx.is_chief:
            return None
        self._catalog.check_root()  # fails early, clearly, on a file or a single step
        if self._storage.atomic_rename:
            self._storage.makedirs(self._catalog.root)
        self._catalog.clean_leftovers()
        return uuid.uuid4().hex[:12]

    # --- waiting --------------------------------------------------------------------

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

    def wait(self) -> None:
        """Block until every pending save is committed; raise a failed save's error (once)."""
        self._drain(0)

    def close(self) -> None:
        """Flush pending saves and release resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain(0)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._stager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - never hide the exception already in flight
            log.error("while closing after an error, a pending save also failed: %s", e)

    def _check_open(self) -> None:
        if self._closed:
            raise DistckptError("this Checkpointer is closed; create a new one")

    # --- reading --------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (a local read; uncommitted work never shows)."""
        return self._catalog.list()

    def find(
        self,
        *,
        min_key: str | None = None,
        max_key: str | None = None,
        predicate: Callable[[CheckpointInfo], bool] | None = None,
    ) -> CheckpointInfo | None:
        """The committed checkpoint ``restore`` would pick with the same arguments (local read)."""
        ranked = self._restorer.rank_candidates(self.list(), None, min_key, max_key, predicate)
        return ranked[0] if ranked else None

    def restore(
        self,
        step: int | None = None,
        *,
        min_key: str | None = None,
        max_key: str | None = None,
        predicate: Callable[[CheckpointInfo], bool] | None = None,
        verify: bool = True,
        strict: bool = True,
    ) -> CheckpointInfo | None:
        """Restore every recoverable, on every rank, from one agreed committed step.

        Without arguments: the newest. ``step=``: exactly that one. ``min_key=``/``max_key=``:
        the best by a meta value. ``predicate=``: newest for which it is true. A step that
        any rank cannot read is skipped (all ranks move together to the next candidate,
        with a warning) unless it was asked for by number. ``verify`` (default on) checks every
        file's CRC-32C as well as its size; ``verify=False`` trusts sizes alone. Returns ``None`` when there is no committed checkpoint. Collective.
        """
        self._check_open()
        self.wait()
        return self._restorer.restore(
            self._adapters,
            step=step,
            min_key=min_key,
            max_key=max_key,
            predicate=predicate,
            verify=verify,
            strict=strict,
        )

    def delete(self, keep: Any = None) -> list[int]:
        """Apply ``keep`` (or this Checkpointer's policy) now. Only the chief touches storage."""
        self._check_open()
        self.wait()
        if not self._ctx.is_chief:
            return []
        return self._catalog.apply_retention(as_policy(keep) if keep is not None else self._policy)

    # --- preemption (see preemption.py for the whole sequence) ------------------------

    @property
    def preemption(self) -> Preemption | None:
        """The installed ``Preemption`` (its ``requested``, ``count``, ``signal_time``), or ``None``."""
        return self._preemption

    def should_stop(self, step: int) -> bool:
        """(all ranks, every step, same order as other collectives) ``True`` on every rank at
        the same step once any rank got a preemption signal; then ``save_and_exit(step)``.

        Every ``check_every`` steps it costs one 4-byte all-reduce on a private gloo group
        (none with one rank). Always ``False`` when the Checkpointer has no ``preemption=``.
        """
        if self._preemption is None:
            return False
        return self._preemption.vote(self._ctx, _check_step(step))

    def save_and_exit(self, step: int, meta: Mapping[str, Any] | None = None) -> NoReturn:
        """(all ranks, once ``should_stop(step)`` is True) the final save, then exit for a restart.

        Waits for an in-flight async save, saves ``step`` and waits for its commit (unless it
        is already committed), closes, then under SLURM the chief runs ``scontrol requeue``;
        every rank raises ``SystemExit(exit_code)`` (75): torchrun restarts the workers while
        ``--max-restarts`` allows. ``restore()`` then resumes every rank from this step. A
        failed final save is logged, not raised. Without ``preemption=`` the defaults apply.
        """
        self._check_open()
        pre = self._preemption or Preemption()
        final_save_and_exit(self, self._ctx, self._catalog.is_committed, pre, _check_step(step), meta)


def _flush_at_exit(ref: weakref.ReferenceType) -> None:
    ckpt = ref()
    if ckpt is not None and not ckpt._closed:
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001
            log.error("a checkpoint save pending at exit failed: %s", e)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            step = int(step.__index__())
        except (AttributeError, TypeError):
            raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if not 0 <= step < 10**12:
        raise ValueError(f"step must be in [0, 1e12), got {step}")
    return step


def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Meta must be JSON; 0-d tensors and numpy scalars are turned into numbers."""
    out = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"meta keys must be str, got {key!r}")
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        try:
            json.dumps(value, allow_nan=True)
        except TypeError as e:
            raise TypeError(f"meta[{key!r}] must be JSON-serialisable: {e}") from None
        out[key] = value
    return out
