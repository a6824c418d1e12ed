"""``Checkpointer``: the one object every rank of a training job creates and calls.

A facade: it validates its options once (``Options``), builds the parts (``_Parts``) and
hands each call to the part that does it: ``save``/``wait`` to ``save.Saves``, ``restore``
to ``restore.Restorer``, ``list``/``find``/``delete`` to the tiers' catalogs, preemption
to ``preemption``. README, "How it works", walks through the save and restore paths.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, NoReturn

from . import retention
from .engine import Engine, make_engine
from .errors import DistckptError
from .layout.catalog import CheckpointInfo, select
from .layout.lease import Lease
from .layout.pointer import Pointers
from .layout.tier import Tier, Tiers
from .log import log
from .options import Options
from .preemption import Preemption, save_and_exit
from .ranks import RankContext
from .recoverables import Recoverables
from .replicas import Replicator
from .restore import Restorer
from .save import Saves
from .save_job import SaveHandle, check_step
from .schedule import Scheduler
from .staging import make_stager
from .step_guard import StepGuard
from .topology import Topology, open_tiers
from .upload import Uploader

__all__ = ["Checkpointer", "SaveHandle"]


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
        replicas: with ``local_dir`` on several nodes, each node's copy of a step is also
            kept by this many partner nodes (``replicas.py``): a lost node's memory comes
            back from its partner, not from ``url``. ``0``: no replicas.
        upload_every: with ``local_dir``, every k-th save also goes to ``url`` (in the
            background); the others stay in node memory. A ``timedelta``: the first save, then
            the first one at least that long after the last that went (the chief's clock).
            The final save before a preemption exit, a save no partner protects, and at
            ``close()`` the newest save, always go.
        process_group: the ranks to coordinate (default: the whole job); ``"local"``: this
            process alone, with no collectives, for frameworks that call checkpoint I/O on
            one rank only (Lightning's ``CheckpointIO``: see ``distckpt.integrations``).
        timeout: for collectives; a rank that dies makes the others fail after this.
        write_threads: files written in parallel per rank.
        stager: ``"auto"``, ``"host"``, ``"pinned"``, ``"gpu"``, ``"direct"`` or a ``Stager``.
        snapshot: ``"now"``: ``save()`` returns once every tensor is copied. ``"overlap"``
            (with ``async_save``): it returns once what the forward pass may change is
            copied; the copy of the optimizers' parameters and state runs beside the next
            forward and backward, and every optimizer's ``step()`` waits until it is done.
            Promise that nothing else changes them in place until that step
            (``step_guard.py``).
        staging_budget: bytes of staging memory allowed; a bigger state is written
            tensor by tensor (``save()`` then blocks until written).
        read_only: restore and list only; takes no lease, cleans nothing, cannot save.
        preemption: ``True`` or a ``Preemption``: SIGTERM/SIGUSR1 handlers (installed from
            the main thread) for ``should_stop``/``save_and_exit``.
        save_policy: when ``maybe_save``/``should_save`` save: a ``SavePolicy`` such as
            ``SaveEverySteps(500) | SaveEverySeconds(1800)``, or an int (every N steps).
        best: what ``best.json`` points at: a meta key (minimised) or a ``KeepBest``;
            by default the best-K rule of ``keep``, if it has one.
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
        replicas: int = 1,
        upload_every: int | timedelta = 1,
        process_group: Any = None,
        timeout: timedelta | float = timedelta(minutes=30),
        max_in_flight: int = 1,
        write_threads: int = 4,
        stager: Any = "auto",
        snapshot: str = "now",
        staging_budget: int | None = None,
        read_only: bool = False,
        preemption: bool | Preemption | None = None,
        save_policy: Any = None,
        best: Any = None,
    ) -> None:
        opts = Options(
            url=url,
            mode=mode,
            async_save=async_save,
            keep=keep,
            storage_options=storage_options,
            local_dir=local_dir,
            local_keep=local_keep,
            replicas=replicas,
            upload_every=upload_every,
            process_group=process_group,
            timeout=timeout,  # type: ignore[arg-type]
            max_in_flight=max_in_flight,
            write_threads=write_threads,
            stager=stager,
            snapshot=snapshot,
            staging_budget=staging_budget,
            read_only=read_only,
            preemption=preemption,  # type: ignore[arg-type]
            save_policy=save_policy,
            best=best,
        )
        self._recs = Recoverables()
        for name, obj in (recoverables or {}).items():
            self._recs.add(name, obj)
        self._parts = _Parts.build(opts, self._recs)
        self._opts = opts
        self._closed = False
        if async_save or local_dir:
            atexit.register(_flush_at_exit, weakref.ref(self))
        if opts.preemption is not None:
            opts.preemption.install()

    # --- recoverables ---------------------------------------------------------------

    def add_recoverable(self, name: str, obj: Any) -> None:
        """Add (or replace) one recoverable under ``name``."""
        self._recs.add(name, obj)

    def add_recoverables(self, recoverables: Mapping[str, Any]) -> None:
        for name, obj in recoverables.items():
            self._recs.add(name, obj)

    def register_hooks(self, cls: type, *, save: Callable[[Any], Any], load: Callable[[Any, Any], None]) -> None:
        """Like ``distckpt.register_hooks`` but for this Checkpointer only."""
        self._recs.register_hooks(cls, save, load)

    @property
    def recoverables(self) -> Mapping[str, Any]:
        """Current objects by name; plain values show what the last restore put there."""
        return MappingProxyType(self._recs.values())

    @property
    def rank(self) -> int:
        return self._parts.ranks.rank

    @property
    def world_size(self) -> int:
        return self._parts.ranks.world_size

    @property
    def read_only(self) -> bool:
        """Opened with ``read_only=True``: restores and lists, never saves or deletes."""
        return self._opts.read_only

    @property
    def url(self) -> str:
        return self._parts.tiers.primary.storage.url

    # --- saving ---------------------------------------------------------------------

    def save(self, step: int, meta: Mapping[str, Any] | None = None, *, end_of_epoch: bool | None = None) -> SaveHandle:
        """Snapshot every recoverable as ``step`` and commit it (in the background with
        ``async_save``). Returns once tensors are staged; the caller may then change them.
        Raises the error of an earlier failed save or upload, once. ``end_of_epoch`` is kept
        in the meta (SpeechBrain's end-of-epoch vs intra-epoch checkpoints) and handed to
        loaders marked with ``mark_as_loader`` on restore. ``meta={"keep": True}`` makes the
        step a milestone that retention never deletes."""
        self._check_open()
        if self._opts.read_only:
            raise DistckptError("this Checkpointer was opened with read_only=True and cannot save")
        handle = self._parts.saves.save(step, meta, end_of_epoch)
        self._parts.scheduler.saved(handle.step)
        return handle

    def should_save(self, step: int) -> bool:
        """(all ranks, same steps) Whether ``save_policy`` says to save at ``step``: the same
        answer on every rank (a time-based policy is decided by the chief and shared: one
        small collective per call). ``False`` without a ``save_policy``."""
        self._check_open()
        preempted = self._opts.preemption is not None and self._opts.preemption.stop_step is not None
        return self._parts.scheduler.should_save(check_step(step), self._parts.saves.busy, preempted)

    def maybe_save(
        self, step: int, meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None
    ) -> SaveHandle | None:
        """``save(step, meta)`` when ``should_save(step)``; ``meta`` may be a callable, called
        only then (a validation pass, say). Returns the handle, or ``None``."""
        if not self.should_save(step):
            return None
        return self.save(step, meta() if callable(meta) else meta)

    def wait(self) -> None:
        """Block until every pending save is committed (and uploaded, with a local tier);
        raise a failed save's or upload's error, once."""
        self._parts.saves.wait()

    def close(self) -> None:
        """Flush pending saves and uploads and release resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._opts.read_only:
                self._parts.saves.flush_remote()
            self.wait()
        finally:
            self._parts.close()

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
        self._parts.saves.settle()
        return self._parts.tiers.list()

    def find(
        self,
        *,
        min_key: str | None = None,
        max_key: str | None = None,
        predicate: Callable[[CheckpointInfo], bool] | None = None,
        importance_key: Callable[[CheckpointInfo], Any] | None = None,
    ) -> CheckpointInfo | None:
        """The committed checkpoint ``restore`` would pick with the same arguments (local read)."""
        ranked = select(self.list(), None, min_key, max_key, predicate, importance_key)
        return ranked[0] if ranked else None

    def restore(
        self,
        step: int | None = None,
        *,
        min_key: str | None = None,
        max_key: str | None = None,
        predicate: Callable[[CheckpointInfo], bool] | None = None,
        importance_key: Callable[[CheckpointInfo], Any] | None = None,
        verify: bool = True,
        strict: bool = True,
    ) -> CheckpointInfo | None:
        """Restore every recoverable, on every rank, from one agreed committed step.

        Without arguments: the newest. ``step=``: exactly that one. ``min_key=``/``max_key=``:
        the best by a meta value. ``importance_key=``: the highest ``importance_key(info)``
        (SpeechBrain's). ``predicate=``: only steps for which it is true. A step that
        any rank cannot read is skipped (all ranks move together to the next candidate,
        with a warning) unless it was asked for by number. ``verify`` (default on) checks every
        file's checksum as well as its size; ``verify=False`` trusts sizes alone. With a local
        tier, a step on local disk is read from there; the info's ``tier`` says which was used.
        Returns ``None`` when there is no committed checkpoint. Collective.
        """
        self._check_open()
        self.wait()
        info = self._parts.restorer.restore(
            self._recs.adapters,
            verify=verify,
            strict=strict,
            step=step,
            min_key=min_key,
            max_key=max_key,
            predicate=predicate,
            importance_key=importance_key,
        )
        self._parts.scheduler.restored(info.step if info else None)
        return info

    def delete(self, keep: Any = None, *, predicate: Callable[[CheckpointInfo], bool] | None = None) -> list[int]:
        """Apply ``keep`` (or this Checkpointer's policy) now; with ``predicate``, only among
        the checkpoints it selects (``Among``). The newest step and milestones are never
        deleted. Only the chief touches storage; returns the deleted steps."""
        self._check_open()
        self.wait()
        if not self._parts.ranks.is_chief:
            return []
        policy = retention.as_policy(keep) if keep is not None else self._opts.policy
        if predicate is not None:
            policy = retention.Among(predicate, policy)
        return retention.apply(policy, self._parts.tiers.primary.catalog, pointers=self._parts.pointers)

    # --- preemption (see preemption.py for the whole sequence) ------------------------

    @property
    def preemption(self) -> Preemption | None:
        """The installed ``Preemption`` (its ``requested``, ``count``, ``signal_time``), or ``None``."""
        return self._opts.preemption

    def should_stop(self, step: int) -> bool:
        """(all ranks, every step, same order as other collectives) ``True`` on every rank at
        the same step once any rank got a preemption signal; then ``save_and_exit(step)``.

        Every ``check_every`` steps it costs one 4-byte all-reduce on a private gloo group
        (none with one rank). Always ``False`` when the Checkpointer has no ``preemption=``.
        """
        if self._opts.preemption is None:
            return False
        return self._opts.preemption.vote(self._parts.ranks, check_step(step))

    def save_and_exit(self, step: int, meta: Mapping[str, Any] | None = None) -> NoReturn:
        """(all ranks, once ``should_stop(step)`` is True) the final save, then exit for a restart.

        Waits for an in-flight async save, saves ``step`` and waits for its commit (unless it
        is already committed), closes, then under SLURM the chief runs ``scontrol requeue``;
        every rank raises ``SystemExit(exit_code)`` (75): torchrun restarts the workers while
        ``--max-restarts`` allows. ``restore()`` then resumes every rank from this step. A
        failed final save is logged, not raised. Without ``preemption=`` the defaults apply.
        """
        self._check_open()
        step = check_step(step)
        pre = self._opts.preemption or Preemption()
        save_and_exit(pre, self._parts.ranks, step, lambda: self._parts.saves.final_save(step, meta), self.close)


@dataclass
class _Parts:
    """What a Checkpointer is made of, built once from its ``Options``."""

    ranks: RankContext
    engine: Engine
    tiers: Tiers
    saves: Saves
    restorer: Restorer
    lease: Lease | None
    scheduler: Scheduler
    pointers: Pointers | None

    @classmethod
    def build(cls, opts: Options, recs: Recoverables) -> _Parts:
        """(all ranks; collectives) In order: the tiers, the private groups and who owns
        which tier, the staging pool (reserved in the background from here on, so the first
        save finds it ready), the opened roots (lease, leftovers), the save side."""
        local = Tier.open("local", opts.local_dir, None, shared=False) if opts.local_dir else None
        tiers = Tiers([t for t in (local, Tier.open("primary", opts.url, opts.storage_options, True)) if t])
        ranks = RankContext(opts.process_group, opts.timeout)
        topology = Topology.find(ranks, opts.local_dir)
        replicator = None
        if local is not None:
            ranks.add_group("up")  # the uploader's own collectives
            replicator = Replicator(ranks, topology, local, opts.replicas, keep=opts.local_keep)
            if replicator.active:
                ranks.add_group("rep")  # node leaders' point-to-point transfers
        engine = make_engine(opts.mode, opts.write_threads)
        nbytes = recs.estimate_bytes(engine.full_state)
        stager = make_stager(
            opts.stager,
            cuda_state=recs.on_cuda(),
            state_bytes=nbytes,
            budget=opts.staging_budget,
            async_save=opts.async_save,
        )
        if engine.writes(ranks):
            stager.reserve(nbytes)
        nonce, lease = open_tiers(ranks, topology, tiers, opts.read_only)
        best = opts.best.rank if opts.best is not None else None
        pointers = Pointers(tiers.primary.catalog, best) if ranks.is_chief and not opts.read_only else None
        uploader = None
        if local is not None:
            uploader = Uploader(
                ranks,
                local,
                tiers.primary,
                topology=topology,
                policy=opts.policy,
                local_keep=opts.local_keep,
                check_lease=lease.check if lease is not None else lambda: None,
                threads=opts.write_threads,
                pointers=pointers,
            )
        saves = Saves(
            ranks,
            topology,
            engine,
            stager,
            tiers,
            recs,
            opts.policy,
            nonce,
            async_save=opts.async_save,
            max_in_flight=opts.max_in_flight,
            uploader=uploader,
            lease=lease,
            pointers=pointers if uploader is None else None,
            replicator=replicator,
            upload_every=opts.upload_every,
            guard=StepGuard(recs.optimizers) if opts.snapshot == "overlap" else None,
        )
        scheduler = Scheduler(opts.save_policy, ranks)
        restorer = Restorer(ranks, topology, tiers, engine, replicator, repair=not opts.read_only)
        return cls(ranks, engine, tiers, saves, restorer, lease, scheduler, pointers)

    def close(self) -> None:
        try:
            self.saves.close()
        finally:
            if self.lease is not None:
                self.lease.release()


def _flush_at_exit(ref: weakref.ReferenceType) -> None:
    ckpt = ref()
    if ckpt is not None and not ckpt._closed:
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001
            log.error("a checkpoint save pending at exit failed: %s", e)
