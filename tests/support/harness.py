"""Run a plain function on N real gloo ranks (separate processes), with a hard timeout.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes from a forkserver
that has torch and distckpt preloaded (a fork costs milliseconds, not a torch import),
joins them into one gloo process group through a FileStore, calls
``fn(rank, world_size, *args)`` in each and returns the ranks' results in rank order.
An exception on any rank fails the test with that rank's traceback; a hang fails it
after ``timeout`` seconds instead of stalling CI.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "distckpt", "tests.support.harness"])
    return _CTX


def _pack(result: Any) -> bytes:
    # Tensors must not travel as shared-memory handles: the child exits right after.
    import torch

    buf = io.BytesIO()
    torch.save(result, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _child(fn: Any, rank: int, world_size: int, store: str, args: tuple, out: Any, timeout: float) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    import torch.distributed as dist

    try:
        if world_size > 1 or store:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{store}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout),
            )
        out.put((rank, "ok", _pack(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Any, world_size: int, *args: Any, timeout: float = 240, init: bool = True) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; results by rank.

    ``init=False`` with ``world_size=1`` runs without any process group at all.
    """
    ctx = _context()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store") if (init or world_size > 1) else ""
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_child, args=(fn, r, world_size, store, args, out, timeout), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results, errors = _collect(procs, out, world_size, timeout)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n{detail}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (hang or crash)")
    return [results[r] for r in range(world_size)]


def _collect(procs: list[Any], out: Any, world_size: int, timeout: float) -> tuple[dict[int, Any], dict[int, str]]:
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    dead_since: float | None = None
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = out.get(timeout=0.5)
        except queue.Empty:
            crashed = [p for p in procs if p.exitcode not in (None, 0)]
            if crashed:  # give the others a moment to report, then stop waiting
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > 15:
                    break
            continue
        if status == "ok":
            results[rank] = _unpack(payload)
        else:
            errors[rank] = payload
    for p in procs:
        if p.is_alive():
            p.kill()
    return results, errors
