"""Warm restore against ``dcp.load`` and the page cache's read ceiling, interleaved in one process.

    python -m benchmarks.warm_restore_bench --size-gb 1 --rounds 9

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

Reported: each method's median and range over the rounds, and per round the ratio of
``dcp.load`` to each (medians and ranges of those ratios: the machine's drift cancels within a
round). The first restore of each in the process, imports and first calls included, is
reported apart. Writes ``<out>/warm_restore.json`` and ``<out>/warm_restore.png``.
"""

from __future__ import annotations

import argparse
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

from .methods import _warm, bit_exact, build_state, state_bytes, zeros_like

METHODS = ("read ceiling", "distckpt", "distckpt verified", "dcp.load")


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
    first = {m: calls[m]() for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for m in order:
            times[m].append(calls[m]())
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in METHODS), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    return {
        "meta": vars(args) | {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "reader_threads": threads},
        "state_bytes": state_bytes(state),
        "first": first,
        "times": times,
        "bit_exact": exact,
    }


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def report(results: dict[str, Any], out: str) -> list[str]:
    times, first = results["times"], results["first"]
    dl = times["dcp.load"]
    lines = [f"{'method':18} {'1st s':>6}  {'median s (range)':22}  dcp.load / method, per round"]
    for m in METHODS:
        ratios = [b / a for a, b in zip(times[m], dl, strict=True)]
        lines.append(f"{m:18} {first[m]:6.3f}  {_spread(times[m]):22}  {_spread(ratios)}x")
    ceiling = [a / b for a, b in zip(times["distckpt"], times["read ceiling"], strict=True)]
    ratio = statistics.median([b / a for a, b in zip(times["distckpt"], dl, strict=True)])
    lines.append(f"distckpt / read ceiling, per round: {_spread(ceiling)}x")
    lines.append(f"[{'PASS' if ratio >= 5 else 'MISS'}] warm restore >= 5x faster than dcp.load: {ratio:.1f}x")
    lines.append(f"bit-exact: {results['bit_exact']}")
    with open(os.path.join(out, "warm_restore.json"), "w") as f:
        json.dump(results, f, indent=1)
    _chart(results, os.path.join(out, "warm_restore.png"))
    return lines


def _chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = results["times"]
    med = [statistics.median(times[m]) for m in METHODS]
    lo = [m - min(times[k]) for m, k in zip(med, METHODS, strict=True)]
    hi = [max(times[k]) - m for m, k in zip(med, METHODS, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh(METHODS, med, xerr=[lo, hi], color=["#999", "#2a7", "#2a7", "#c55"], capsize=4)
    ax.set_xlabel(f"warm restore of {results['state_bytes'] / 1e9:.2f} GB, seconds (median, range)")
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
