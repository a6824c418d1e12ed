"""Staging memory: exactly-sized byte buffers (arenas), sliced into one view per tensor.

A save's tensors are laid out back to back in one arena, each slice ``ALIGN``-aligned;
``ArenaPool`` keeps the arenas of one kind (host, pinned host, or GPU) and hands them out
per save, so staging memory is allocated once and reused, never grown per save. A state's
layout (``Layout``) and its views into an arena (``Arena.views``) are made once and reused by
every save of a state laid out alike: per-tensor work, not bytes, is what a state of 100,000
small tensors costs.
DTensors contribute their local shard (``local_part``) and are dressed again as DTensors
over their staged copy (``rewrap``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Callable

import torch

from .log import log

try:  # DTensor lives here from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

ALIGN = 64  # bytes; keeps every slice aligned for vectorised copies and O_DIRECT-friendly
_PAGE = 4096
FAULT_CHUNK = 4 << 20  # a background reserve checks every 4 MB whether a save wants its arena (a save waits <= ~1 ms)
_ids = itertools.count()
_shared: weakref.WeakValueDictionary[int, Arena] = (
    weakref.WeakValueDictionary()
)  # open host arenas in shared memory (``dcp.write_process`` maps them)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory this rank owns: a DTensor's local shard, else itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def rewrap(original: torch.Tensor, local_copy: torch.Tensor) -> torch.Tensor:
    """``local_copy`` dressed as ``original`` (same DTensor mesh, placements, global shape)."""
    if DTensor is not None and isinstance(original, DTensor):
        return DTensor.from_local(
            local_copy,
            original.device_mesh,
            original.placements,
            run_check=False,
            shape=original.shape,
            stride=original.stride(),
        )
    return local_copy


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``ALIGN`` (each tensor's slice of a pool)."""
    return -(-nbytes // ALIGN) * ALIGN


class Layout:
    """Where a save's tensors lie in an arena (back to back, each slice ``ALIGN``-aligned),
    kept from save to save: a state of 100,000 tensors is laid out (and its views into the
    arena made, ``Arena.views``) once, not on every save. ``specs``: each tensor's local
    (dtype, shape), in order; ``same`` tells whether a save's tensors are laid out like this."""

    def __init__(self, names: list[str], specs: list[tuple[torch.dtype, torch.Size]]) -> None:
        self.names, self.specs = names, specs
        self.offsets, self.total = [], 0
        for dtype, shape in specs:
            self.offsets.append(self.total)
            self.total += aligned(shape.numel() * dtype.itemsize)

    @staticmethod
    def specs_of(locals_: list[torch.Tensor]) -> list[tuple[torch.dtype, torch.Size]]:
        return [(t.dtype, t.shape) for t in locals_]

    def same(self, names: list[str], specs: list[tuple[torch.dtype, torch.Size]]) -> bool:
        return self.specs == specs and self.names == names


class Arena:
    """One byte buffer, allocated once at its exact size (never rounded up to a power of
    two as torch's caching pinned allocator does). Host arenas can be pinned in place with
    ``cudaHostRegister`` so that device-to-host copies run at full PCIe speed."""

    def __init__(self, nbytes: int, device: str = "cpu", pin: bool = False, fault: bool = True) -> None:
        self.nbytes, self.device, self.pinned = max(int(nbytes), ALIGN), device, False
        self.faulted = 0  #: bytes from the start whose pages are in memory
        self.id, self.fd = next(_ids), -1
        self._views: tuple[Layout, list[torch.Tensor]] | None = None  # the last layout's views
        if device == "cpu":
            # page-aligned and a whole number of pages, as cudaHostRegister wants
            self.size = -(-self.nbytes // _PAGE) * _PAGE
            self.buf = self._host_memory(self.size)  # virtual memory only: instant
            self._np = self.buf.numpy()
            if fault:
                self.fault_in()
                if pin:
                    self.pin()
        else:
            self.buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            self.faulted = self.nbytes
            self._np = None

    def _host_memory(self, size: int) -> torch.Tensor:
        """Shared memory (a ``memfd``) that the writer process can map, else private memory."""
        try:
            self.fd = os.memfd_create(f"distckpt-staging-{self.id}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)  # MAP_SHARED: what the writer process maps
        except (AttributeError, OSError) as e:  # not Linux, or no memfd: the save thread writes
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
            log.debug("staging in private memory (%s): saves are written by threads", e)
            raw = torch.empty(size + _PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % _PAGE
            return raw[start : start + size]
        _shared[self.id] = self
        self._release = weakref.finalize(self, _unshare, self.id, self.fd)
        return torch.frombuffer(self._map, dtype=torch.uint8)

    def fault_in(self, stop: Callable[[], bool] | None = None) -> bool:
        """Bring every page into memory now (one write per page, ``FAULT_CHUNK`` bytes at a
        time), so that a save's copy runs at memcpy speed instead of paying the page faults
        (0.6 s per GB on a VM). Returns False when ``stop()`` asked it to stop between chunks;
        the rest is then faulted by whoever writes it first."""
        size = self.buf.numel()
        while self.faulted < size:
            if stop is not None and stop():
                return False
            end = min(self.faulted + FAULT_CHUNK, size)
            self.buf[self.faulted : end : _PAGE].zero_()
            self.faulted = end
        return True

    def pin(self) -> None:
        """Pin the (faulted) buffer in place for full-speed device-to-host copies."""
        if not self.pinned:
            self.pinned = _register(self.buf)

    def view(self, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A contiguous ``dtype`` tensor of ``shape`` over ``[offset, offset + nbytes)``. On
        the host its storage is exactly that slice (``torch.frombuffer``), so DCP's writer
        neither clones it nor serialises the whole arena."""
        n = shape.numel() * dtype.itemsize
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        if self._np is None:
            raw = self.buf[offset : offset + n]
        else:
            raw = torch.frombuffer(self._np[offset : offset + n], dtype=torch.uint8)
        return raw.view(dtype).view(shape)

    def views(self, lay: Layout) -> list[torch.Tensor]:
        """Every tensor of ``lay`` in this arena, in order; made once per layout (the same
        view objects save after save: the writer's plan cache recognises them)."""
        if self._views is None or self._views[0] is not lay:
            self._views = (
                lay,
                [self.view(at, *spec) for at, spec in zip(lay.offsets, lay.specs, strict=True)],
            )
        return self._views[1]

    def views_made(self, lay: Layout) -> list[torch.Tensor] | None:
        """``views(lay)`` if they are made already, else None."""
        return self._views[1] if self._views is not None and self._views[0] is lay else None

    def locate(self, t: torch.Tensor) -> int | None:
        """The offset in this arena of ``t``'s bytes (contiguous, on the host), or None."""
        start = t.data_ptr() - self.buf.data_ptr()
        if t.device.type != "cpu" or not t.is_contiguous() or not 0 <= start <= self.size - t.nbytes:
            return None
        return start

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False
        if self.fd >= 0:
            self._release()  # the mapping (and the tensors over it) stay valid until dropped
            self.fd = -1


def _unshare(arena_id: int, fd: int) -> None:
    """(close, or the arena's garbage collection) The writer process unmaps it; fd closed."""
    from .dcp.write_process import WRITER

    WRITER.forget(arena_id)
    os.close(fd)


def find_arena(t: torch.Tensor, arenas: list[Arena]) -> tuple[Arena, int] | None:
    """The arena among ``arenas`` holding ``t``'s bytes, and their offset in it; or None."""
    for arena in arenas:
        offset = arena.locate(t)
        if offset is not None:
            return arena, offset
    return None


def shared_arenas() -> dict[int, Arena]:
    """The host arenas a writer process can map, by id."""
    return dict(_shared)


def _register(buf: torch.Tensor) -> bool:
    try:
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    except Exception as e:  # noqa: BLE001 - pinning is an optimisation, never a failure
        log.warning("could not pin the staging buffer (%s); device-to-host copies will be slower", e)
        return False
    ok = int(getattr(err, "value", err)) == 0
    if not ok:
        log.warning("cudaHostRegister failed (%s); device-to-host copies will be slower", err)
    return ok


class ArenaPool:
    """Free arenas of one kind. A save takes one and gives it back after its write;
    with ``max_in_flight`` saves pending, at most that many exist."""

    def __init__(self, device: str, pin: bool) -> None:
        self.device, self.pin = device, pin
        self._free: list[Arena] = []
        self._lock = threading.Lock()
        self.capacity = 0

    def take(self, nbytes: int) -> Arena:
        with self._lock:
            fits = [a for a in self._free if a.nbytes >= nbytes]
            if fits:
                arena = min(fits, key=lambda a: a.nbytes)
                self._free.remove(arena)
                return arena
            stale = self._free.pop() if self._free else None
        if stale is not None:
            log.info("staging pool grows from %.3f to %.3f GB (the state grew)", stale.nbytes / 1e9, nbytes / 1e9)
            self._drop(stale)
        arena = Arena(nbytes, self.device, self.pin)
        with self._lock:
            self.capacity += arena.nbytes
        return arena

    def add(self, nbytes: int) -> Arena:
        """A new arena of ``nbytes`` in the pool, its pages not yet faulted in (instant)."""
        arena = Arena(nbytes, self.device, pin=False, fault=False)
        with self._lock:
            self.capacity += arena.nbytes
            self._free.append(arena)
        return arena

    def give(self, arena: Arena) -> None:
        with self._lock:
            self._free.append(arena)

    def _drop(self, arena: Arena) -> None:
        arena.close()
        with self._lock:
            self.capacity -= arena.nbytes

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for arena in free:
            self._drop(arena)
