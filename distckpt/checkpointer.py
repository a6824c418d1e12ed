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
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from types import MappingProxyType
from typing import Any, NoReturn

from .dist import RankContext
from .engine import make_engine
from .errors import DistckptError
from .info import CheckpointInfo
from .lease import Lease
from .log import log
from .preemption import Preemption, as_preemption, final_save_and_exit
from .recoverables import Adapter, link_optimizers, make_adapter
from .restoring import Restorer
from .retention import RetentionPolicy, as_policy
from .saving import SaveHandle, SaveJob, Saver, check_meta, check_step
from .staging import Staged, Stager, make_stager
from .tiers import Nodes, Tier, Uploader
from .tree import split


class Checkpointer:
    """Save and restore a training job's state, on every rank, consistently.

    Constructing it is a collective: every rank must do it, in the same order.

    Args:
        url: a directory (local disk, NFS, Lustre) or an fsspec URL (``s3://bucket/run``).
        recoverables: ``{name: obj}``: modules, optimizers, schedulers, any ``Stateful``,
            tensors, dicts, plain JSON values (see ``add_recoverable``).
        mode: ``"sharded"`` (every rank writes its shards through DCP) or ``"chief"``
            (rank 0 writes the full, gathered state; every rank reads it back).
        async_save: ``save()`` returns once tensors are staged; the rest runs on a
            background thread. ``max_in_flight`` saves may be pending at once.
        keep: a ``Keep`` or any ``RetentionPolicy``; ``None`` keeps everything.
        storage_options: passed to fsspec (S3 endpoint, credentials, retries).
        local_dir, local_keep: a node-local tier in front of ``url`` (see README).
        process_group: the ranks to coordinate (default: the whole job).
        timeout: for collectives; a rank that dies makes the others fail after this.
        write_threads: files written in parallel per rank.
        stager: ``"auto"``, ``"host"``, ``"pinned"``, ``"gpu"``, ``"direct"`` or a ``Stager``.
        staging_budget: bytes of staging memory allowed; a bigger state is written
            tensor by tensor (``save()`` then blocks until written).
        read_only: restore and list only; takes no lease, cleans nothing, cannot save.
        preemption: ``True`` or a ``Preemption``: SIGTERM/SIGUSR1 handlers (installed from
            the main thread) for ``should_stop``/``save_and_exit``.
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
        local_dir: str | None = None,
        local_keep: int = 2,
        process_group: Any = None,
        timeout: timedelta | float = timedelta(minutes=30),
        max_in_flight: int = 1,
        write_threads: int = 4,
        stager: str | Stager = "auto",
        staging_budget: int | None = None,
        read_only: bool = False,
        preemption: bool | Preemption | None = None,
    ) -> None:
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        if max_in_flight < 1 or local_keep < 1:
            raise ValueError("max_in_flight and local_keep must be >= 1")
        self._engine = make_engine(mode, write_threads)
        self._policy: RetentionPolicy = as_policy(keep)
        self._remote = Tier.open("primary", url, storage_options, shared=True)
        self._local = Tier.open("local", local_dir, None, shared=False) if local_dir else None
        self._ctx = RankContext(process_group, timeout)
        self._nodes = Nodes.find(self._ctx, local_dir)
        if self._local is not None:
            self._ctx.add_group("up")  # the uploader's own collectives
        self._hooks: dict[type, Any] = {}
        self._adapters: dict[str, Adapter] = {}
        self.add_recoverables(recoverables or {})
        self._stager: Stager = self._make_stager(stager, staging_budget)
        self._max_in_flight = max_in_flight
        self._pending: deque[SaveHandle] = deque()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-save") if async_save else None
        self._closed = False
        self._read_only = read_only
        self._lease: Lease | None = None
        nonce = self._ctx.agree(self._open_roots, f"opening {url}")[0]
        self._uploader = None
        if self._local is not None:
            self._uploader = Uploader(
                self._ctx,
                self._local,
                self._remote,
                nodes=self._nodes,
                policy=self._policy,
                local_keep=local_keep,
                check_lease=self._check_lease,
                threads=write_threads,
            )
        self._saver = Saver(
            ctx=self._ctx,
            engine=self._engine,
            stager=self._stager,
            tier=self._local or self._remote,
            remote=self._remote,
            policy=self._policy,
            nonce=nonce,
            nodes=self._nodes,
            uploader=self._uploader,
            lease=self._lease,
        )
        tiers = [t for t in (self._local, self._remote) if t is not None]
        self._restorer = Restorer(self._ctx, tiers, self._engine)
        if async_save or local_dir:
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
        return self._remote.storage.url

    # --- saving ---------------------------------------------------------------------

    def save(self, step: int, meta: Mapping[str, Any] | None = None) -> SaveHandle:
        """Snapshot every recoverable as ``step`` and commit it (in the background with
        ``async_save``). Returns once tensors are staged; the caller may then change them.
        Raises the error of an earlier failed save or upload, once."""
        self._check_open()
        if self._read_only:
            raise DistckptError("this Checkpointer was opened with read_only=True and cannot save")
        t0 = time.perf_counter()
        step, meta = check_step(step), check_meta(meta)
        self._drain(self._max_in_flight - 1)
        try:
            job = self._snapshot(step, meta, t0)
        except Exception as e:  # noqa: BLE001 - other ranks are heading into collectives:
            # carry the error into the job so that every rank raises it together.
            job = SaveJob(step, meta, {}, {}, Staged({}), error=e)
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(self._saver.run(job))
            except BaseException as e:
                future.set_exception(e)
            handle = SaveHandle(step, future)
            handle.wait()  # a sync save raises right here, on every rank
            return handle
        handle = SaveHandle(step, self._executor.submit(self._saver.run, job))
        with self._lock:
            self._pending.append(handle)
        if job.staged.live:  # nothing was copied: the tensors must be written before we return
            self._drain(0)
        return handle

    def _snapshot(self, step: int, meta: dict[str, Any], t0: float) -> SaveJob:
        full = self._engine.full_state
        skeletons, per_rank, tensors = {}, {}, {}
        for name, adapter in self._adapters.items():
            state = adapter.state(full)
            if adapter.per_rank:
                per_rank[name] = split(state, name, inline=True)[0]
                continue
            skeletons[name], found = split(state, name)
            tensors.update(found)  # names start with the recoverable's own (dot-free) name: no clash
        t_stage = time.perf_counter()
        staged = self._stager.stage(tensors) if self._engine.writes(self._ctx) else Staged({})
        now = time.perf_counter()
        return SaveJob(
            step, meta, skeletons, per_rank, staged, now - t0, now - t_stage, self._stager.capacity, started=t0
        )

    def _make_stager(self, kind: str | Stager, budget: int | None) -> Stager:
        """Pick the stager and, on writing ranks, reserve its pool in the background now."""
        full = self._engine.full_state
        nbytes = sum(a.estimate_bytes(full) for a in self._adapters.values() if not a.per_rank)
        cuda = any(a.on_cuda() for a in self._adapters.values())
        stager = make_stager(kind, cuda_state=cuda, state_bytes=nbytes, budget=budget)
        if self._engine.writes(self._ctx):
            stager.reserve(nbytes)
        return stager

    def _open_roots(self) -> str | None:
        """(chief) the remote root and the lease; (node leaders) the local tier."""
        if self._local is not None and self._nodes.leader:
            self._local.catalog.check_root()
            if not self._read_only:
                self._local.storage.makedirs(self._local.catalog.root)
                self._local.catalog.clean_leftovers()
        if not self._ctx.is_chief:
            return None
        self._remote.catalog.check_root()  # fails early, clearly, on a file or a single step
        if self._read_only:
            return uuid.uuid4().hex[:12]
        if self._remote.storage.atomic_rename:
            self._remote.storage.makedirs(self._remote.catalog.root)
        self._lease = Lease(self._remote.storage, self._remote.catalog.root)
        self._lease.acquire()  # one writing job per root; refuses a second one clearly
        self._remote.catalog.clean_leftovers()  # safe: no other job writes here
        return uuid.uuid4().hex[:12]

    def _is_committed(self, step: int) -> bool:
        return any(t.catalog.is_committed(step) for t in (self._local, self._remote) if t is not None)

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

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
        if self._uploader is not None:
            self._uploader.check_errors()

    def wait(self) -> None:
        """Block until every pending save is committed (and uploaded, with a local tier);
        raise a failed save's or upload's error, once."""
        self._drain(0)
        if self._uploader is not None:
            self._uploader.wait()
        self._saver.settle()

    def close(self) -> None:
        """Flush pending saves and uploads and release resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._uploader is not None:
                self._uploader.close()
            self._saver.close()
            self._stager.close()
            if self._lease is not None:
                self._lease.release()

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
        """Committed checkpoints, oldest first (a local read; uncommitted work never shows).
        With a local tier, steps not uploaded yet show with ``tier="local"``."""
        self._saver.settle()
        return self._restorer.list()

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
        file's checksum as well as its size; ``verify=False`` trusts sizes alone. With a local
        tier, a step on local disk is read from there; the info's ``tier`` says which was used.
        Returns ``None`` when there is no committed checkpoint. Collective.
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
        return self._remote.catalog.apply_retention(as_policy(keep) if keep is not None else self._policy)

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
        return self._preemption.vote(self._ctx, check_step(step))

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
        final_save_and_exit(self, self._ctx, self._is_committed, pre, check_step(step), meta)


def _flush_at_exit(ref: weakref.ReferenceType) -> None:
    ckpt = ref()
    if ckpt is not None and not ckpt._closed:
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001
            log.error("a checkpoint save pending at exit failed: %s", e)
