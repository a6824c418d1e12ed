"""Stagers: copy a save's tensors somewhere the training loop will not touch.

The ``Stager`` seam. Call order for one save, on every rank that writes:
  0. (construction, background thread) ``reserve(nbytes)``: allocate the pool ahead of
     the first save, so its cost never lands on a save's stall.
  1. (training thread) ``stage(tensors) -> Staged``: only the copy; the one part of
     ``save()`` that blocks training.
  2. (background thread) ``materialize(staged) -> {fqn: cpu tensor}`` for the writer
     (the GPU-side snapshot does its device-to-host copy here).
  3. (background thread, after the write) ``release(staged)``: the pool is reused by the
     next save, never grown per save.

Implementations: ``PoolStager`` (one exactly-sized host buffer, pinned when staging from
CUDA, sliced per tensor), ``DeviceSnapshotStager`` (a spare-GPU-memory snapshot, copied to
the pinned pool in the background) and ``DirectStager`` (no copy: the save blocks until
written; used when the state exceeds the staging memory budget).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .log import log

try:  # DTensor lives here from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

ALIGN = 64  # bytes; keeps every slice aligned for vectorised copies and O_DIRECT-friendly
_PAGE = 4096


@dataclass
class Staged:
    """One save's staged tensors. ``live``: they are the caller's own tensors (no copy),
    so the save must be written before ``save()`` returns."""

    tensors: dict[str, torch.Tensor]
    nbytes: int = 0
    live: bool = False
    arenas: list[Any] = field(default_factory=list)
    event: Any = None


class Stager(Protocol):
    name: str

    def reserve(self, nbytes: int) -> None: ...
    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged: ...
    def materialize(self, staged: Staged) -> dict[str, torch.Tensor]: ...
    def release(self, staged: Staged) -> None: ...
    def close(self) -> None: ...
    @property
    def capacity(self) -> int: ...


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


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """Aligned byte offsets of every tensor's local data in one buffer, and the total."""
    offsets, total = {}, 0
    for fqn, t in tensors.items():
        local = local_part(t)
        offsets[fqn] = total
        total += aligned(local.numel() * local.element_size())
    return offsets, total


class Arena:
    """One byte buffer, allocated once at its exact size (never rounded up to a power of
    two as torch's caching pinned allocator does). Host arenas can be pinned in place with
    ``cudaHostRegister`` so that device-to-host copies run at full PCIe speed."""

    def __init__(self, nbytes: int, device: str = "cpu", pin: bool = False) -> None:
        self.nbytes, self.device, self.pinned = max(int(nbytes), ALIGN), device, False
        if device == "cpu":
            # page-aligned and a whole number of pages, as cudaHostRegister wants
            size = -(-self.nbytes // _PAGE) * _PAGE
            raw = torch.empty(size + _PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % _PAGE
            self.buf = raw[start : start + size]
            self.buf.zero_()  # fault every page in now (multi-threaded), not on a save
            if pin:
                self.pinned = _register(self.buf)
            self._np = self.buf.numpy()
        else:
            self.buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            self._np = None

    def view(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor shaped like ``like`` over ``[offset, offset + nbytes)``.

        On the host its storage is exactly that slice (``torch.frombuffer``), so DCP's
        writer neither clones it nor serialises the whole arena.
        """
        n = like.numel() * like.element_size()
        if n == 0:
            return torch.empty(like.shape, dtype=like.dtype)
        if self._np is None:
            raw = self.buf[offset : offset + n]
        else:
            raw = torch.frombuffer(self._np[offset : offset + n], dtype=torch.uint8)
        return raw.view(like.dtype).view(like.shape)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False


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


class _ArenaPool:
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


class PoolStager:
    """Copies into one reusable, exactly-sized host buffer per in-flight save.

    ``pin=True`` pins it (CUDA sources): the copies run at the device-to-host ceiling and
    the pool is allocated once, at ``reserve`` time, in the background.
    """

    def __init__(self, pin: bool = False) -> None:
        self.name = "pinned" if pin else "host"
        self.host = _ArenaPool("cpu", pin)
        self._reserving: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        return self.host.capacity

    def reserve(self, nbytes: int) -> None:
        if nbytes <= 0:
            return

        def allocate() -> None:
            try:
                self.host.give(self.host.take(nbytes))
            except Exception as e:  # noqa: BLE001 - the first save will allocate instead
                log.warning("could not reserve %.3f GB of staging memory ahead of time: %s", nbytes / 1e9, e)

        self._reserving = threading.Thread(target=allocate, name="distckpt-reserve", daemon=True)
        self._reserving.start()

    def _wait_reserved(self) -> None:
        if self._reserving is not None and self._reserving.is_alive():
            log.info("waiting for the staging pool allocation to finish")
            self._reserving.join()

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        self._wait_reserved()
        offsets, total = layout(tensors)
        arena = self.host.take(total)
        copies = _copy_into(arena, tensors, offsets, non_blocking=arena.pinned)
        _sync_devices(tensors)
        return Staged({fqn: rewrap(tensors[fqn], dst) for fqn, dst in copies.items()}, total, arenas=[arena])

    def materialize(self, staged: Staged) -> dict[str, torch.Tensor]:
        return staged.tensors

    def release(self, staged: Staged) -> None:
        for arena in staged.arenas:
            self.host.give(arena)
        staged.arenas.clear()
        staged.tensors.clear()

    def close(self) -> None:
        self._wait_reserved()
        self.host.close()


class DeviceSnapshotStager(PoolStager):
    """GPU-side snapshot: a device-to-device copy into spare GPU memory is all that blocks
    training; the device-to-host copy into the pinned pool runs on the background thread."""

    def __init__(self, device: str = "cuda") -> None:
        super().__init__(pin=True)
        self.name = "gpu"
        self.device = device
        self.gpu = _ArenaPool(device, False)

    def reserve(self, nbytes: int) -> None:
        if nbytes > 0:
            self.gpu.give(self.gpu.take(nbytes))  # device memory: fast, and must be checked now
        super().reserve(nbytes)

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        offsets, total = layout(tensors)
        arena = self.gpu.take(total)
        copies = _copy_into(arena, tensors, offsets, non_blocking=False)
        out = {fqn: (tensors[fqn], offsets[fqn], dst) for fqn, dst in copies.items()}
        event = torch.cuda.Event()
        event.record()
        return Staged(out, total, arenas=[arena], event=event)  # type: ignore[arg-type]

    def materialize(self, staged: Staged) -> dict[str, torch.Tensor]:
        self._wait_reserved()
        host = self.host.take(staged.nbytes)
        staged.arenas.append(host)
        stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(staged.event)
            gpu_arena = staged.arenas[0]
            host.buf[: staged.nbytes].copy_(gpu_arena.buf[: staged.nbytes], non_blocking=host.pinned)
        stream.synchronize()
        return {fqn: rewrap(t, host.view(off, dst)) for fqn, (t, off, dst) in staged.tensors.items()}  # type: ignore[misc]

    def release(self, staged: Staged) -> None:
        gpu_arena, *hosts = staged.arenas
        self.gpu.give(gpu_arena)
        for arena in hosts:
            self.host.give(arena)
        staged.arenas.clear()
        staged.tensors.clear()

    @property
    def capacity(self) -> int:
        return self.host.capacity + self.gpu.capacity

    def close(self) -> None:
        super().close()
        self.gpu.close()


class DirectStager:
    """No staging at all: DCP copies tensor by tensor while writing, so host memory stays
    within a few tensors, and ``save()`` blocks until the step is written."""

    name = "direct"
    capacity = 0

    def reserve(self, nbytes: int) -> None:
        pass

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        return Staged(dict(tensors), live=True)

    def materialize(self, staged: Staged) -> dict[str, torch.Tensor]:
        return staged.tensors

    def release(self, staged: Staged) -> None:
        staged.tensors.clear()

    def close(self) -> None:
        pass


def _copy_into(
    arena: Arena, tensors: dict[str, torch.Tensor], offsets: dict[str, int], non_blocking: bool
) -> dict[str, torch.Tensor]:
    """Copy every tensor's local data into its slice of ``arena``; returns the slices."""
    out = {}
    for fqn, t in tensors.items():
        local = local_part(t).detach()
        dst = arena.view(offsets[fqn], local)
        dst.copy_(local, non_blocking=non_blocking and local.is_cuda)
        out[fqn] = dst
    return out


def _sync_devices(tensors: dict[str, torch.Tensor]) -> None:
    """Wait for non-blocking device-to-host copies: after ``save()`` returns the caller
    may change its tensors from any stream."""
    devices = {local_part(t).device for t in tensors.values() if local_part(t).is_cuda}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()


STAGERS = ("auto", "host", "pinned", "gpu", "direct")


def make_stager(kind: Any, *, cuda_state: bool, state_bytes: int, budget: int | None) -> Stager:
    """Choose a stager. ``auto``: pinned pool for CUDA state, host pool otherwise, and
    direct (blocking, bounded memory) when the state exceeds ``budget`` bytes."""
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
        kind = "pinned" if cuda_state else "host"
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
