"""Stagers: copy a save's tensors somewhere the training loop will not touch.

The ``Stager`` seam has the shape of DCP's ``AsyncStager`` (``stage`` on the training
thread, ``close``), with two differences that keep memory flat: the pool is reserved ahead
of the first save, and ``stage`` returns a ``Staged`` handle whose buffers go back to the
pool once the save is written. Call order for one save, on every rank that writes:
  0. (construction) ``reserve(nbytes)``: the pool's arena exists at once and its pages are
     faulted in on a background thread; a save that comes before that is done takes the
     arena over without waiting (and faults the part not reached yet as it copies).
  1. (training thread) ``stage(tensors) -> Staged``: only the copy; the one part of
     ``save()`` that blocks training. Under ``snapshot="overlap"`` (``step_guard.py``)
     ``stage(tensors, later=names)``: the copy of ``names`` follows on the snapshot thread
     (``Staged.ready``) while the next optimizer step is held until it is done.
  2. (save thread) ``staged.materialize() -> {fqn: cpu tensor}`` for the writer (the
     GPU-side snapshot does its device-to-host copy here).
  3. (save thread, after the write) ``staged.release()``: the buffers return to the pool.

Implementations: ``PoolStager`` (one exactly-sized host arena, pinned when staging from
CUDA), ``DeviceSnapshotStager`` (a spare-GPU-memory snapshot, copied to the pinned pool
in the background) and ``DirectStager`` (no copy: the save blocks until written; used when
the state exceeds the staging memory budget). ``make_stager`` chooses.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, wait
from typing import Any, Protocol

import torch

from .arena import Arena, ArenaPool, Layout, local_part, rewrap
from .background import yield_to_training
from .copies import copy_later, copy_pairs, start_copy_threads, sync_devices
from .log import log


class Staged(Protocol):
    """One save's staged tensors."""

    nbytes: int  #: staging bytes this save holds
    live: bool  #: the caller's own tensors (no copy): the save must be written before save() returns

    def materialize(self) -> dict[str, torch.Tensor]:
        """(save thread) ``{fqn: host tensor}`` to write; DTensors keep their placements."""
        ...

    def release(self) -> None:
        """(save thread, after the write) Give the buffers back; the tensors become invalid."""
        ...


class Stager(Protocol):
    name: str

    @property
    def capacity(self) -> int:
        """Bytes of staging memory held now (host and device)."""
        ...

    def reserve(self, nbytes: int) -> None: ...
    def stage(self, tensors: dict[str, torch.Tensor], later: Collection[str] = ()) -> Staged:
        """Copy ``tensors``; those named in ``later`` may be copied after this returns (see
        ``PoolStager.stage``). Only called with ``later`` under ``snapshot="overlap"``."""
        ...

    def close(self) -> None: ...


class HostStaged:
    """Tensors ready to write, plus what to do once they are written. ``ready``: a copy
    still running (``snapshot="overlap"``) whose result is the tensors; ``materialize``
    waits for it."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        nbytes: int = 0,
        live: bool = False,
        on_release: Callable[[], None] | None = None,
        ready: Future | None = None,
    ) -> None:
        self.tensors, self.nbytes, self.live, self._on_release = tensors, nbytes, live, on_release
        self.ready = ready
        self.held = 0.0  # seconds optimizer steps waited for ``ready`` (step_guard.py)

    def materialize(self) -> dict[str, torch.Tensor]:
        if self.ready is not None:
            self.tensors = self.ready.result()  # the deferred copy's error, if it failed, fails this save
        return self.tensors

    def release(self) -> None:
        if self.ready is not None:
            wait([self.ready])  # never give the buffers back while the copy still writes them
        self.tensors = {}
        if self._on_release is not None:
            self._on_release()
            self._on_release = None


class PoolStager:
    """Copies into one reusable, exactly-sized host arena per in-flight save.

    ``pin=True`` pins it (CUDA sources): the copies run at the device-to-host ceiling and
    the pool is allocated once, at ``reserve`` time, in the background.
    """

    def __init__(self, pin: bool = False) -> None:
        self.name = "pinned" if pin else "host"
        self.host = ArenaPool("cpu", pin)
        self._reserving: threading.Thread | None = None
        self._stop = threading.Event()
        self._layout: Layout | None = None  # the last save's (most saves are laid out alike)

    @property
    def capacity(self) -> int:
        return self.host.capacity

    def reserve(self, nbytes: int) -> None:
        """The arena is in the pool at once (virtual memory); its pages are faulted in, and
        pinned for CUDA sources, on a background thread."""
        if nbytes <= 0:
            return
        try:
            arena = self.host.add(nbytes)
        except Exception as e:  # noqa: BLE001 - the first save will allocate instead
            log.warning("could not reserve %.3f GB of staging memory ahead of time: %s", nbytes / 1e9, e)
            return

        def fault_in() -> None:
            yield_to_training()
            if arena.fault_in(stop=self._stop.is_set) and self.host.pin:
                arena.pin()

        self._stop.clear()
        self._reserving = threading.Thread(target=fault_in, name="distckpt-reserve", daemon=True)
        self._reserving.start()
        start_copy_threads(nbytes)

    def wait_reserved(self) -> None:
        """Until the reserve has faulted in (and pinned) the whole pool."""
        if self._reserving is not None and self._reserving.is_alive():
            self._reserving.join()

    def _claim(self) -> None:
        """(stage) Take the pool over from a reserve still running. A host pool stops it at
        its next chunk: the save copies at memcpy speed into what is faulted and faults the
        rest as it copies, never waiting on the background. A pinned pool waits: pinning
        needs every page."""
        if self._reserving is None or not self._reserving.is_alive():
            return
        if self.host.pin:
            log.info("waiting for the staging pool to be pinned")
        else:
            self._stop.set()
        self._reserving.join()

    def _layout_of(self, tensors: dict[str, torch.Tensor]) -> tuple[Layout, list[torch.Tensor]]:
        """The layout of ``tensors`` (the last one when they are laid out alike) and their
        local parts, in order."""
        srcs = [local_part(t) for t in tensors.values()]
        names, specs = list(tensors), Layout.specs_of(srcs)
        if self._layout is None or not self._layout.same(names, specs):
            self._layout = Layout(names, specs)
        return self._layout, srcs

    def stage(self, tensors: dict[str, torch.Tensor], later: Collection[str] = ()) -> Staged:
        """Copy ``tensors`` into the pool; the copy of those named in ``later`` runs on the
        snapshot thread after this returns (``snapshot="overlap"``: the caller holds
        whatever would change them until ``Staged.ready`` is done)."""
        self._claim()
        lay, srcs = self._layout_of(tensors)
        arena = self.host.take(lay.total)
        release = functools.partial(self.host.give, arena)
        if not later:
            dsts = arena.views(lay)
            copy_pairs(list(zip(dsts, srcs, strict=True)), non_blocking=arena.pinned)
            sync_devices(srcs)
            return HostStaged(_rewrapped(tensors, dsts), lay.total, on_release=release)
        now = [i for i, name in enumerate(tensors) if name not in later]
        after = [i for i, name in enumerate(tensors) if name in later]
        # a new layout's views (a few us each) are made on the snapshot thread; what is
        # copied now goes through views of its own
        made = arena.views_made(lay)
        eager = [(made[i] if made else arena.view(lay.offsets[i], *lay.specs[i]), srcs[i]) for i in now]
        copy_pairs(eager, non_blocking=arena.pinned)
        sync_devices([src for _, src in eager])

        def rest() -> dict[str, torch.Tensor]:  # on the snapshot thread
            dsts = arena.views(lay)
            copy_pairs([(dsts[i], srcs[i]) for i in after], non_blocking=arena.pinned)
            return _rewrapped(tensors, dsts)

        ready = copy_later(rest, [srcs[i] for i in after])
        return HostStaged({}, lay.total, on_release=release, ready=ready)

    def close(self) -> None:
        self._stop.set()
        self.wait_reserved()
        self.host.close()


class DeviceSnapshotStager(PoolStager):
    """GPU-side snapshot: a device-to-device copy into spare GPU memory is all that blocks
    training; the device-to-host copy into the pinned pool runs on the save thread."""

    def __init__(self, device: str = "cuda") -> None:
        super().__init__(pin=True)
        self.name = "gpu"
        self.device = device
        self.gpu = ArenaPool(device, False)

    def reserve(self, nbytes: int) -> None:
        if nbytes > 0:
            self.gpu.give(self.gpu.take(nbytes))  # device memory: fast, and must be checked now
        super().reserve(nbytes)

    def stage(self, tensors: dict[str, torch.Tensor], later: Collection[str] = ()) -> Staged:
        """A device-to-device copy of everything (``later`` too: it is fast)."""
        lay, srcs = self._layout_of(tensors)
        arena = self.gpu.take(lay.total)
        copy_pairs(list(zip(arena.views(lay), srcs, strict=True)), non_blocking=False)
        event = torch.cuda.Event()
        event.record()
        return _DeviceStaged(self, tensors, lay, arena, event)

    @property
    def capacity(self) -> int:
        return self.host.capacity + self.gpu.capacity

    def close(self) -> None:
        super().close()
        self.gpu.close()


class _DeviceStaged:
    """A snapshot in GPU memory; ``materialize`` copies it into a pinned host arena."""

    live = False

    def __init__(
        self,
        stager: DeviceSnapshotStager,
        originals: dict[str, torch.Tensor],
        lay: Layout,
        gpu: Arena,
        event: Any,
    ) -> None:
        self.stager, self.originals, self.lay, self.nbytes = stager, originals, lay, lay.total
        self.gpu, self.event = gpu, event
        self.host: Arena | None = None

    def materialize(self) -> dict[str, torch.Tensor]:
        self.stager._claim()
        host = self.host = self.stager.host.take(self.nbytes)
        stream = torch.cuda.Stream(device=self.stager.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.event)
            host.buf[: self.nbytes].copy_(self.gpu.buf[: self.nbytes], non_blocking=host.pinned)
        stream.synchronize()
        return _rewrapped(self.originals, host.views(self.lay))

    def release(self) -> None:
        self.stager.gpu.give(self.gpu)
        if self.host is not None:
            self.stager.host.give(self.host)
            self.host = None
        self.originals = {}


class DirectStager:
    """No staging at all: DCP copies tensor by tensor while writing, so host memory stays
    within a few tensors, and ``save()`` blocks until the step is written."""

    name = "direct"
    capacity = 0

    def reserve(self, nbytes: int) -> None:
        pass

    def stage(self, tensors: dict[str, torch.Tensor], later: Collection[str] = ()) -> Staged:
        return HostStaged(dict(tensors), live=True)  # written before save() returns: nothing can wait

    def close(self) -> None:
        pass


def _rewrapped(tensors: dict[str, torch.Tensor], dsts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{fqn: its staged copy}``, DTensors rewrapped around their staged local parts."""
    return {fqn: rewrap(t, dst) for (fqn, t), dst in zip(tensors.items(), dsts, strict=True)}


STAGERS = ("auto", "host", "pinned", "gpu", "direct")


def make_stager(
    kind: Any, *, cuda_state: bool, state_bytes: int, budget: int | None, async_save: bool = True
) -> Stager:
    """Choose a stager. ``auto``: pinned pool for CUDA state; for host state a host pool when
    saves run in the background, and direct (no copy: a synchronous save blocks training
    anyway, so a copy would only cost time and memory) otherwise; direct as well when the
    state exceeds ``budget`` bytes."""
    if not isinstance(kind, str):
        return kind
    if kind not in STAGERS:
        raise ValueError(f"stager must be one of {STAGERS} or a Stager, got {kind!r}")
    if budget is not None and state_bytes > budget and kind != "direct":
        log.warning(
            "the state (%.3f GB) exceeds the staging budget (%.3f GB): saves write straight from the "
            "tensors, tensor by tensor, and block until written",
            state_bytes / 1e9,
            budget / 1e9,
        )
        return DirectStager()
    if kind == "auto":
        kind = "pinned" if cuda_state else "host" if async_save else "direct"
    if kind == "gpu":
        if not cuda_state:
            raise ValueError("stager='gpu' needs CUDA tensors in the state")
        free, _ = torch.cuda.mem_get_info()
        if free < state_bytes * 1.05:
            log.warning(
                "not enough spare GPU memory for a GPU-side snapshot (%.2f GB free); using the pinned pool", free / 1e9
            )
            return PoolStager(pin=True)
        return DeviceSnapshotStager()
    if kind == "direct":
        return DirectStager()
    return PoolStager(pin=kind == "pinned" and torch.cuda.is_available())
