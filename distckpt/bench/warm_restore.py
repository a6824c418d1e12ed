"""Warm restore against ``dcp.load`` and the page cache's read ceiling, interleaved in one process.

    python -m benchmarks.warm_restore_bench --size-gb 1 --rounds 15 [--cold]

The state of ``save_bench`` (bf16 params, fp32 master weights and two Adam moments, ~200
parameters of sizes spanning 1000x) is saved once by distckpt and once by ``dcp.save``; both
steps are read once so that they sit in the page cache. Then, each round in a rotated order:

* ``distckpt``: a fresh ``Checkpointer`` restores into freshly zeroed tensors (sizes checked,
  no checksums: ``restore(verify=False)``);
* ``distckpt verified``: the same with every file checksummed (XXH3, in the same pass);
* ``dcp.load``: of the same state into freshly zeroed tensors;
* ``read ceiling``: every data file of distckpt's step read whole into memory allocated and
  touched beforehand (as the restores' targets are), by as many threads as distckpt's reader
  uses - the copy out of the page cache that any restore into existing tensors must make.

With ``--cold``, the ceiling, the verified restore and ``dcp.load`` also run with the files
evicted from the page cache first (``fsync`` + ``POSIX_FADV_DONTNEED``; the warm ones read
the files back in before they start): the ceiling and the restore then read the same files
from the same state of every cache below the page cache, so their ratio holds where the
disk's absolute speed cannot be trusted (a VM's disk cached by its host).

Reported: each method's median and range over the rounds, and per round the ratio of
``dcp.load`` to each (medians and ranges of those ratios: the machine's drift cancels within a
round). The first restore of each in the process, imports and first calls included, is
reported apart. Writes ``<out>/warm_restore.json`` and ``<out>/warm_restore.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import distckpt

from .methods import _evict, _warm, bit_exact, build_state, state_bytes, zeros_like

METHODS = ("read ceiling", "distckpt", "distckpt verified", "dcp.load")
COLD = ("read ceiling", "distckpt verified", "dcp.load")  # with --cold, each also from the disk


def _cold(call: Callable[[], float], root: str) -> float:
    _evict(root)
    return call()


def _warm_first(call: Callable[[], float], root: str) -> float:
    _warm(root)
    return call()


def _data_files(root: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".distcp"))


def _ceiling(files: list[str], threads: int) -> Callable[[], None]:
    """A read of ``files`` whole into touched memory of their size, on ``threads`` threads."""
    bufs = [torch.ones(os.path.getsize(p), dtype=torch.uint8) for p in files]

    def read() -> None:
        def worker(mine: list[int]) -> None:
            for i in mine:
                view = memoryview(bufs[i].numpy()).cast("B")
                with open(files[i], "rb", buffering=0) as f:
                    done = 0
                    while done < len(view):
                        done += f.readinto(view[done:])

        pool = [threading.Thread(target=worker, args=(list(range(k, len(files), threads)),)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    return read


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    state = build_state("cpu", int(args.size_gb * 1e9))
    ours, theirs = os.path.join(args.dir, "distckpt"), os.path.join(args.dir, "dcp")
    shutil.rmtree(args.dir, ignore_errors=True)
    with distckpt.Checkpointer(ours, {"state": state}) as ckpt:
        ckpt.save(1).wait()
    dcp.save({"state": state}, checkpoint_id=theirs, no_dist=True)
    _warm(ours)
    _warm(theirs)
    threads = min(8, os.cpu_count() or 1)  # what distckpt's reader uses (dcp.read_items)
    ceiling = _ceiling(_data_files(ours), threads)
    exact = True

    def restore(verify: bool) -> Callable[[], float]:
        def once() -> float:
            nonlocal exact
            target = zeros_like(state)
            with distckpt.Checkpointer(ours, {"state": target}, stager="direct") as ckpt:
                t0 = time.perf_counter()
                ckpt.restore(verify=verify)
                seconds = time.perf_counter() - t0
            exact = exact and bit_exact(target, state)
            return seconds

        return once

    def load() -> float:
        nonlocal exact
        target = zeros_like(state)
        t0 = time.perf_counter()
        dcp.load({"state": target}, checkpoint_id=theirs, no_dist=True)
        seconds = time.perf_counter() - t0
        exact = exact and bit_exact(target, state)
        return seconds

    def read() -> float:
        t0 = time.perf_counter()
        ceiling()
        return time.perf_counter() - t0

    calls = {"read ceiling": read, "distckpt": restore(False), "distckpt verified": restore(True), "dcp.load": load}
    roots = {"read ceiling": ours, "distckpt": ours, "distckpt verified": ours, "dcp.load": theirs}
    methods = list(METHODS)
    if args.cold:  # the same reads with the files evicted from the page cache first
        for m in COLD:
            calls[f"{m}, cold"] = functools.partial(_cold, calls[m], roots[m])
            calls[m] = functools.partial(_warm_first, calls[m], roots[m])  # a cold one ran before
        methods += [f"{m}, cold" for m in COLD]
    first = {m: calls[m]() for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            times[m].append(calls[m]())
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in methods), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    return {
        "meta": vars(args) | {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "reader_threads": threads},
        "methods": methods,
        "state_bytes": state_bytes(state),
        "first": first,
        "times": times,
        "bit_exact": exact,
    }


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def report(results: dict[str, Any], out: str) -> list[str]:
    times, first = results["times"], results["first"]

    def per_round(a: str, b: str) -> list[float]:
        return [y / x for x, y in zip(times[a], times[b], strict=True)]

    lines = [f"{'method':24} {'1st s':>6}  {'median s (range)':22}  dcp.load (same cache) / method, per round"]
    for m in results["methods"]:
        ref = "dcp.load, cold" if m.endswith(", cold") else "dcp.load"
        lines.append(f"{m:24} {first[m]:6.3f}  {_spread(times[m]):22}  {_spread(per_round(m, ref))}x")
    ratio = statistics.median(per_round("distckpt", "dcp.load"))
    lines.append(f"read ceiling / distckpt, per round: {_spread(per_round('distckpt', 'read ceiling'))}x")
    lines.append(f"[{'PASS' if ratio >= 5 else 'MISS'}] warm restore >= 5x faster than dcp.load: {ratio:.1f}x")
    if "distckpt verified, cold" in times:
        cold = per_round("distckpt verified, cold", "read ceiling, cold")
        verdict = "PASS" if statistics.median(cold) >= 0.9 else "MISS"
        lines.append(
            f"[{verdict}] cold restore (verified) >= 0.9x the read ceiling from the disk, same eviction, per round: "
            f"{_spread(cold)}x"
        )
    lines.append(f"bit-exact: {results['bit_exact']}")
    with open(os.path.join(out, "warm_restore.json"), "w") as f:
        json.dump(results, f, indent=1)
    _chart(results, os.path.join(out, "warm_restore.png"))
    return lines


def _chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, methods = results["times"], results["methods"]
    med = [statistics.median(times[m]) for m in methods]
    lo = [m - min(times[k]) for m, k in zip(med, methods, strict=True)]
    hi = [max(times[k]) - m for m, k in zip(med, methods, strict=True)]
    colors = ["#c55" if "dcp" in m else "#999" if "ceiling" in m else "#2a7" for m in methods]
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.5 * len(methods)))
    ax.barh(methods, med, xerr=[lo, hi], color=colors, capsize=4)
    ax.set_xlabel(f"restore of {results['state_bytes'] / 1e9:.2f} GB, seconds (median, range)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="warm_restore_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="torch's intra-op threads")
    p.add_argument("--cold", action="store_true", help="also each read with the files evicted from the page cache")
    p.add_argument("--out", default="bench_out/warm_restore")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: <out>/work)")
    args = p.parse_args(argv)
    args.dir = args.dir or os.path.join(args.out, "work")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = run(args)
    for line in report(results, args.out):
        print(line)
    return 0 if results["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
