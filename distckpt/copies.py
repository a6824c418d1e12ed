"""How a stage's copies run (``staging.py`` says what is copied where).

* ``copy_pairs``: ``dst.copy_(src)`` for a list of pairs; host-to-host copies of a big
  state spread over ``copy_threads()`` threads (``copy_parallel``), each making one
  ``torch._foreach_copy_`` call that lets go of the GIL; device sources in order.
* ``copy_later``: the same on the snapshot thread, after ``save()`` has returned
  (``snapshot="overlap"``, ``step_guard.py``), device sources on a side stream.
* ``sync_devices``: wait for the non-blocking device-to-host copies of a stage.

The copy threads and the snapshot thread are shared by every Checkpointer of the process
and started ahead of the first save (``start_copy_threads``, ``start_snapshot_thread``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool, threads: int | None = None) -> None:
    """``dst.copy_(src)`` for every pair (``src``: a tensor's local data, ``dst``: its slice
    of an arena).

    Host-to-host copies of a big state are spread over ``copy_threads()`` threads: training
    waits for this copy in any case, and one core's memcpy is well below what the memory
    can move. Device sources copy in order (the device's copy engine sets the pace)."""
    host = []
    with torch.no_grad():  # a parameter's copy records no autograd history
        for dst, src in pairs:
            if src.is_cuda:
                dst.copy_(src, non_blocking=non_blocking)
            else:
                host.append((dst, src))
        copy_parallel(host, threads)


def copy_later(copy: Callable[[], T], srcs: list[torch.Tensor]) -> Future[T]:
    """Run ``copy()`` (copies out of ``srcs``) on the snapshot thread; the future holds what
    it returns once every byte is in place. Host copies in it are spread over the copy
    threads as in ``stage``: the next optimizer step waits for them, and on the 2-core VM
    two threads beside a one-thread training loop lost it less time than one (overlap
    bench, 3 rounds: 0.030 s against 0.070 s per save). Device sources copy on a side
    stream that starts where the caller's stream is now, so that what training queues after
    ``save()`` returns is not in it."""
    marks = {d: torch.cuda.current_stream(d).record_event() for d in {s.device for s in srcs if s.is_cuda}}

    def on_side_streams() -> T:
        with contextlib.ExitStack() as on_side:
            streams = []
            for device, mark in marks.items():
                side = _side_stream(device)
                side.wait_event(mark)
                on_side.enter_context(torch.cuda.stream(side))
                streams.append(side)
            out = copy()
        for side in streams:
            side.synchronize()
        return out

    return snapshot_thread().submit(on_side_streams)


def copy_threads() -> int:
    """Threads a host-to-host staging copy uses: ``DISTCKPT_COPY_THREADS``, else the CPUs
    this process may run on, at most 4 (memory bandwidth, not cores, is the limit beyond)."""
    if os.environ.get("DISTCKPT_COPY_THREADS"):
        return max(1, int(os.environ["DISTCKPT_COPY_THREADS"]))
    try:
        cpus = len(os.sched_getaffinity(0))  # a SLURM or cgroup CPU set, not the machine's cores
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


_PARALLEL_FROM = 32 << 20  # bytes: below this one thread copies (starting threads costs more)
_copiers: ThreadPoolExecutor | None = None
_copiers_lock = threading.Lock()


def copy_parallel(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int | None = None) -> None:
    """``dst.copy_(src)`` for every pair, in ``threads`` byte-balanced parts run together
    (a big contiguous tensor is cut into parts too); torch releases the GIL while it copies."""
    threads = copy_threads() if threads is None else threads
    total = sum(d.nbytes for d, _ in pairs)
    if threads < 2 or total < _PARALLEL_FROM:
        _copy_all(pairs)
        return
    parts = _split(pairs, -(-total // threads))
    pool = _copy_pool()
    futures = [pool.submit(_copy_all, part) for part in parts[1:]]
    try:
        _copy_all(parts[0])  # this thread takes a part too
    finally:
        wait(futures)  # never return (or raise) while a copy still writes
    for f in futures:
        f.result()


def _split(pairs: list[tuple[torch.Tensor, torch.Tensor]], per: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The pairs in parts of about ``per`` bytes each, in order; plain same-dtype contiguous
    tensors are cut at part boundaries (as flat views), others go whole into one part."""
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    room = per
    for dst, src in pairs:
        if dst.nbytes <= room or src.dtype != dst.dtype or not src.is_contiguous() or src.numel() < 2:
            parts[-1].append((dst, src))  # whole: it fits, or cannot be cut
            room -= dst.nbytes
        else:
            flat_dst, flat_src, at = dst.view(-1), src.reshape(-1), 0
            while at < flat_src.numel():
                take = min(flat_src.numel() - at, max(1, room // src.itemsize))
                parts[-1].append((flat_dst[at : at + take], flat_src[at : at + take]))
                at += take
                room -= take * src.itemsize
                if room <= 0 and at < flat_src.numel():
                    parts.append([])
                    room = per
        if room <= 0:
            parts.append([])
            room = per
    return [p for p in parts if p]


def _copy_all(part: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One call into torch for the whole part, which lets go of the GIL: for a state of many
    small tensors a Python loop of ``copy_`` would hold it between every two copies (the copy
    threads then take turns instead of copying together: 100,000 tensors of 1 KB, 0.18 s
    against 0.05 s)."""
    if not part:
        return
    with torch.no_grad():  # thread-local: the copy threads' too
        if _foreach_copy is not None:
            _foreach_copy([d for d, _ in part], [s for _, s in part])
            return
        for dst, src in part:
            dst.copy_(src)


_foreach_copy = getattr(torch, "_foreach_copy_", None)


def _copy_pool() -> ThreadPoolExecutor:
    global _copiers
    with _copiers_lock:
        if _copiers is None:
            _copiers = ThreadPoolExecutor(3, thread_name_prefix="distckpt-copy")  # idle threads cost nothing
        return _copiers


_snapshotter: ThreadPoolExecutor | None = None
_side_streams: dict[torch.device, Any] = {}


def snapshot_thread() -> ThreadPoolExecutor:
    """One thread for deferred copies, in save order (a later copy done means every earlier
    one is). Not lowered in priority: the next optimizer step waits for it."""
    global _snapshotter
    with _copiers_lock:
        if _snapshotter is None:
            _snapshotter = ThreadPoolExecutor(1, thread_name_prefix="distckpt-snapshot")
        return _snapshotter


def start_copy_threads(nbytes: int) -> None:
    """Start the copy threads a stage of ``nbytes`` will use now, not in the first save's stall."""
    if nbytes >= _PARALLEL_FROM:
        for _ in range(copy_threads() - 1):
            _copy_pool().submit(int)


def start_snapshot_thread() -> None:
    """Start the snapshot thread now (``snapshot="overlap"``), not in the first save's stall."""
    snapshot_thread().submit(int)


def _side_stream(device: torch.device) -> Any:
    with _copiers_lock:
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device)
        return _side_streams[device]


def sync_devices(srcs: list[torch.Tensor]) -> None:
    """Wait for non-blocking device-to-host copies: after ``save()`` returns the caller
    may change its tensors (``srcs``: their local parts) from any stream."""
    devices = {t.device for t in srcs if t.is_cuda}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
