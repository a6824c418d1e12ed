"""The contenders and ceilings of ``distckpt.bench.save``; each runs in its own fresh process.

Every method saves the same training state ``repeats`` times and restores the last save
from a warm page cache onto the state's device, checking the result bit for bit.
``stall`` is how long the training loop is blocked (until its tensors may change);
``total`` is until the checkpoint is durable (fsync'ed).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
import torch.distributed.checkpoint as dcp

import distckpt

GB = 1e9


def build_state(device: str, size_bytes: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A realistic mixed-precision training state: bf16 params, fp32 master weights and two
    fp32 Adam moments (14 bytes per parameter) in ~200 parameters of varied sizes."""
    g = torch.Generator().manual_seed(seed)
    n_params = max(4, min(196, size_bytes // 100_000))
    weights = torch.exp(torch.rand(n_params, generator=g) * math.log(1000.0))  # sizes span 1000x
    numels = (weights / weights.sum() * (size_bytes / 14)).long().clamp(min=1)
    gen = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, dict[str, torch.Tensor]] = {"params": {}, "master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for i, n in enumerate(numels.tolist()):
        cols = 1024 if n >= 4096 else 1
        shape = (max(1, n // cols), cols) if cols > 1 else (n,)
        master = torch.randn(shape, generator=gen, device=device)
        state["master"][f"layer{i}"] = master
        state["params"][f"layer{i}"] = master.to(torch.bfloat16)
        state["exp_avg"][f"layer{i}"] = torch.randn(shape, generator=gen, device=device) * 1e-3
        state["exp_avg_sq"][f"layer{i}"] = torch.rand(shape, generator=gen, device=device) * 1e-6
    _sync(device)
    return state


def state_bytes(state: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for group in state.values() for t in group.values())


def zeros_like(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: torch.zeros_like(t) for n, t in g.items()} for k, g in state.items()}


def bit_exact(a: Any, b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(a[k][n].to(t.device), t) for k, g in b.items() for n, t in g.items())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fsync_tree(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


class PeakRSS:
    """Samples this process's resident memory every few milliseconds; ``mark()`` notes the
    peak so far (the saves' peak, before restore allocates its targets)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def mark(self) -> int:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --- contenders --------------------------------------------------------------------------


def run_torch_save(state, workdir, repeats, threads, device, rss):
    saves, path = [], ""
    for i in range(repeats):
        path = os.path.join(workdir, f"state_{i}.pt")
        t, _ = _timed(lambda p=path: (torch.save(state, p), _fsync_tree(p)))
        saves.append({"stall": t, "total": t})
        if i:
            os.remove(os.path.join(workdir, f"state_{i - 1}.pt"))
    peak = rss.mark()
    restore, loaded = _timed(lambda: (torch.load(path, map_location=device, weights_only=True), _sync(device))[0])
    return {"saves": saves, "save_peak_host_bytes": peak, "restore": restore, "bit_exact": bit_exact(loaded, state)}


def _dcp_restore(state, ckpt_dir, device):
    """(warm, cold, bit-exact): ``dcp.load`` from the page cache, then with the step's files
    evicted from it."""
    times, ok = [], True
    for cold in (False, True):
        if cold:
            _evict(ckpt_dir)
        target = zeros_like(state)
        _sync(device)
        t, _ = _timed(lambda t=target: (dcp.load(t, checkpoint_id=ckpt_dir, no_dist=True), _sync(device)))
        times.append(t)
        ok = ok and bit_exact(target, state)
    return times[0], times[1], ok


def run_dcp_save(state, workdir, repeats, threads, device, rss, writer_threads=1):
    saves, ckpt_dir = [], ""
    for i in range(repeats):
        ckpt_dir = os.path.join(workdir, f"step_{i}")
        writer = dcp.FileSystemWriter(ckpt_dir, thread_count=writer_threads)
        t, _ = _timed(lambda w=writer: dcp.save(state, storage_writer=w, no_dist=True))
        saves.append({"stall": t, "total": t})
        _drop_previous(workdir, i)
    peak = rss.mark()
    restore, cold, ok = _dcp_restore(state, ckpt_dir, device)
    return {"saves": saves, "save_peak_host_bytes": peak, "restore": restore, "restore_cold": cold, "bit_exact": ok}


def run_dcp_async(state, workdir, repeats, threads, device, rss, variant="default"):
    """``default``: ``dcp.async_save`` as shipped. ``cached``: a FileSystemWriter reused across
    saves with ``cache_staged_state_dict=True``. ``stager``: a pinned ``DefaultStager``."""
    saves, ckpt_dir = [], ""
    cached = dcp.FileSystemWriter(os.path.join(workdir, "step_0"), thread_count=threads, cache_staged_state_dict=True)
    for i in range(repeats):
        ckpt_dir = os.path.join(workdir, f"step_{i}")
        t0 = time.perf_counter()
        if variant == "stager":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            writer = dcp.FileSystemWriter(ckpt_dir, thread_count=threads)
            # a new stager per save: in torch 2.11 a DefaultStager cannot stage twice
            stager = DefaultStager(StagingOptions(True, False, True, True))
            resp = dcp.async_save(state, storage_writer=writer, async_stager=stager, no_dist=True)
            resp.staging_completion.result()
            stall = time.perf_counter() - t0
            resp.upload_completion.result()
        else:
            kwargs: dict[str, Any] = {"checkpoint_id": ckpt_dir}
            if variant == "cached":
                kwargs["storage_writer"] = cached
            future = dcp.async_save(state, no_dist=True, **kwargs)
            stall = time.perf_counter() - t0
            future.result()
        saves.append({"stall": stall, "total": time.perf_counter() - t0})
        _drop_previous(workdir, i)
    peak = rss.mark()
    restore, cold, ok = _dcp_restore(state, ckpt_dir, device)
    return {"saves": saves, "save_peak_host_bytes": peak, "restore": restore, "restore_cold": cold, "bit_exact": ok}


def run_distckpt(
    state, workdir, repeats, threads, device, rss, async_save=True, stager="auto", at_once=False, new_files=False
):
    if new_files:  # every save into new files, as before saves wrote over the deleted steps' (layout/recycle.py)
        os.environ["DISTCKPT_RECYCLE"] = "0"
    root = os.path.join(workdir, "ckpt")
    t0 = time.perf_counter()
    ckpt = distckpt.Checkpointer(
        root, {"state": state}, async_save=async_save, stager=stager, write_threads=threads, keep=distckpt.Keep(last=1)
    )
    construct = time.perf_counter() - t0
    if not at_once:  # a training job builds its Checkpointer long before the first save (the one private reach)
        getattr(ckpt._parts.saves.stager, "wait_reserved", lambda: None)()
    reserve = time.perf_counter() - t0
    saves = []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        handle = ckpt.save(step)
        stall = time.perf_counter() - t0
        info = handle.wait()
        saves.append(
            {"stall": stall, "total": time.perf_counter() - t0, "stats": info.stats.as_dict() if info.stats else {}}
        )
    staging = saves[-1]["stats"].get("staging_bytes", 0)
    ckpt.close()
    peak = rss.mark()
    out = {
        "saves": saves,
        "construct": construct,
        "reserve": reserve,
        "staging_bytes": staging,
        "save_peak_host_bytes": peak,
    }
    _warm(root)  # written with O_DIRECT, the files are not in the page cache: the column is a warm read
    for key, verify in (("restore", False), ("restore_verified", True), ("restore_cold", True)):
        if key == "restore_cold":
            _evict(root)
        target = zeros_like(state)
        _sync(device)
        reader = distckpt.Checkpointer(root, {"state": target}, stager="direct")
        t, _ = _timed(lambda r=reader, v=verify: (r.restore(verify=v), _sync(device)))
        out[key] = t
        out["bit_exact"] = out.get("bit_exact", True) and bit_exact(target, state)
        reader.close()
    return out


def _warm(root: str) -> None:
    """Read every file under ``root`` once, so that it is in the page cache."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


def _evict(root: str) -> None:
    """Drop every file under ``root`` from the page cache (``_evict_files``)."""
    _evict_files([os.path.join(folder, n) for folder, _, names in os.walk(root) for n in names])


def _evict_files(paths: list[str]) -> None:
    """Drop the files' pages (clean once fsynced) from the page cache, so that the next
    read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _drop_previous(workdir: str, i: int) -> None:
    if i:
        shutil.rmtree(os.path.join(workdir, f"step_{i - 1}"), ignore_errors=True)


def methods(device: str) -> dict[str, Callable[..., dict[str, Any]]]:
    from functools import partial

    table: dict[str, Callable[..., dict[str, Any]]] = {
        "torch.save": run_torch_save,
        "dcp.save": run_dcp_save,
        "dcp.save[threads]": lambda *a: run_dcp_save(*a, writer_threads=a[3]),
        "dcp.async_save": run_dcp_async,
        "distckpt sync": partial(run_distckpt, async_save=False),
        "distckpt async": partial(run_distckpt, async_save=True, stager="auto"),
        "distckpt async[at once]": partial(run_distckpt, async_save=True, stager="auto", at_once=True),
        "distckpt async[new files]": partial(run_distckpt, async_save=True, stager="auto", new_files=True),
    }
    if device.startswith("cuda"):  # DCP's tuned variants stage through pinned (CUDA) memory
        table["dcp.async_save[cached]"] = partial(run_dcp_async, variant="cached")
        table["dcp.async_save[pinned stager]"] = partial(run_dcp_async, variant="stager")
        table["distckpt async[gpu]"] = partial(run_distckpt, async_save=True, stager="gpu")
    return table


# --- ceilings ----------------------------------------------------------------------------


def ceilings(state, workdir, threads, device) -> dict[str, float]:
    """Copy-to-host and disk limits of this machine, measured on the same state and disk."""
    nbytes = state_bytes(state)
    tensors = [t for g in state.values() for t in g.values()]
    pool = torch.empty(nbytes + 64 * len(tensors), dtype=torch.uint8, pin_memory=device.startswith("cuda"))
    pool.zero_()

    def copy_all() -> None:
        off = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            pool[off : off + n].view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
            off += -(-n // 64) * 64
        _sync(device)

    copy_all()
    copy_s, _ = _timed(copy_all)
    out = {"stage_floor_s": copy_s, "stage_gbps": nbytes / copy_s / GB}
    disk_bytes = min(nbytes, int(4 * GB))
    _disk(workdir, disk_bytes, threads, pool)  # warm-up: file system metadata, writeback threads
    for n in sorted({1, threads}):  # the fastest of two tries per thread count
        write_s, read_s, cold_s, over_s = min(_disk(workdir, disk_bytes, n, pool) for _ in range(2))
        out[f"disk_write_fsync_gbps_t{n}"] = disk_bytes / write_s / GB
        out[f"page_cache_read_gbps_t{n}"] = disk_bytes / read_s / GB
        out[f"disk_read_gbps_t{n}"] = disk_bytes / cold_s / GB
        out[f"disk_overwrite_fsync_gbps_t{n}"] = disk_bytes / over_s / GB
    out["disk_write_fsync_gbps"] = max(v for k, v in out.items() if k.startswith("disk_write"))
    out["disk_overwrite_fsync_gbps"] = max(v for k, v in out.items() if k.startswith("disk_overwrite"))
    return out


def _disk(workdir: str, total: int, n: int, pool: torch.Tensor) -> tuple[float, float, float, float]:
    """(write+fsync into new files, read from the page cache, read from the disk, write+fsync
    over the same files' blocks) seconds for ``total`` bytes over ``n`` threads, each thread
    its own file. The last is the ceiling of a save that writes over a deleted step's files
    (``layout/recycle.py``): no blocks to allocate (or, on a thin disk, to provision)."""
    chunk = 16 << 20
    src = memoryview(pool[: min(chunk, pool.numel())].numpy())
    per = total // n
    paths = [os.path.join(workdir, f"ceiling_{n}_{i}.bin") for i in range(n)]

    def write(path: str, over: bool = False) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if over else os.O_TRUNC), 0o644)
        left = per
        while left > 0:
            left -= os.write(fd, src[: min(left, len(src))])
        os.fsync(fd)
        os.close(fd)

    dest = memoryview(pool.numpy())

    def read(path: str) -> None:
        # into memory of its own, as a restore reads into the state's tensors (a small
        # reused buffer would stay in the CPU's cache and flatter the ceiling)
        at = paths.index(path) * per
        end = at + per
        with open(path, "rb", buffering=0) as f:
            while at < end and (n := f.readinto(dest[at : min(at + chunk, end)])):
                at += n

    write_s = _parallel(write, paths)
    read_s = _parallel(read, paths)
    _evict_files(paths)  # and again from the disk
    cold_s = _parallel(read, paths)
    over_s = _parallel(functools.partial(write, over=True), paths)
    for p in paths:
        os.remove(p)
    return write_s, read_s, cold_s, over_s


def _parallel(fn: Callable[[str], None], paths: list[str]) -> float:
    threads = [threading.Thread(target=fn, args=(p,)) for p in paths]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0
