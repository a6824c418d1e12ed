"""The memory tier with peer replicas: time until a save is protected, and recovery after a node loss.

    python -m benchmarks.memory_bench --size-mb 256 --rounds 3

4 ranks as 2 simulated nodes (each node its own ``local_dir`` under ``/dev/shm``), the remote
tier on S3 (a moto server on 127.0.0.1, through ``S3Proxy``, which counts what it serves). A
DDP-like state (model + two Adam moments, the same on every rank) in sharded mode.

* *Protected*: a synchronous save with ``replicas=1`` returns when every node's copy is in
  its own memory and on its partner; with ``replicas=0`` when it is in its own memory only.
  Both in the same rounds, interleaved (order rotating); ratio replicas=1 / replicas=0.
* *Recovery*: after the last save, node 1's memory is wiped (a replaced node) and every rank
  restores: node 0's ranks read their node's memory (their own copy and node 1's replica),
  node 1's ranks receive what they need from them over gloo. The reference is restoring the
  same step from S3 (no memory tier). Ratio S3 / memory, and the bytes S3 served during each
  restore. Also: when node 1's copies and replicas are back (refilled in the background
  after the restore, while training would resume).

Writes ``<out>/memory.json`` and ``<out>/memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from .restore import _s3, _state

NODES, PER_NODE = 2, 2


def _rank_main(rank: int, world: int, store: str, job: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    import distckpt

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    state = _state(job["size"], seed=0)
    local = os.path.join(job["mem"], f"node{rank // PER_NODE}") if job.get("mem") else None
    kwargs = {"storage_options": job["options"], "local_dir": local, "replicas": job.get("replicas", 1)}
    out: dict[str, Any] = {}
    if job["what"] == "save":
        with distckpt.Checkpointer(job["root"], state, **kwargs) as ckpt:
            times = []
            for step in range(1, job["saves"] + 2):  # the first is a warm-up (pool, plans)
                dist.barrier()
                t0 = time.perf_counter()
                ckpt.save(step).wait()
                dist.barrier()
                times.append(time.perf_counter() - t0)
            out["seconds"] = statistics.median(times[1:])
    else:  # restore
        if rank == 0 and job.get("wipe") is not None:
            shutil.rmtree(os.path.join(job["mem"], f"node{job['wipe']}"), ignore_errors=True)
        target = {k: {n: torch.zeros_like(t) for n, t in g.items()} for k, g in state.items()}
        dist.barrier()
        with distckpt.Checkpointer(job["root"], target, **kwargs) as ckpt:
            dist.barrier()
            if rank == 0:
                open(job["mark"], "w").close()  # the proxy's counters start here
            dist.barrier()
            t0 = time.perf_counter()
            info = ckpt.restore()
            dist.barrier()
            t1 = time.perf_counter()
            ckpt.wait()  # the wiped node's copies and replicas refilled in the background
            dist.barrier()
            out = {"seconds": t1 - t0, "tier": info.tier, "step": info.step,
                   "protected_again": time.perf_counter() - t0}  # fmt: skip
        out["bit_exact"] = all(torch.equal(target[k][n], t) for k, g in state.items() for n, t in g.items())
    with open(os.path.join(job["out"], f".rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _launch(job: dict[str, Any], proxy: Any = None) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    world = NODES * PER_NODE
    with tempfile.TemporaryDirectory() as tmp:
        job = dict(job, mark=os.path.join(tmp, "mark"))
        ctx = mp.spawn(_rank_main, args=(world, os.path.join(tmp, "store"), job), nprocs=world, join=False)
        if proxy is not None:
            while not os.path.exists(job["mark"]) and not all(not p.is_alive() for p in ctx.processes):
                time.sleep(0.005)
            proxy.reset()
        ctx.join()
    results = []
    for r in range(world):
        path = os.path.join(job["out"], f".rank{r}.json")
        results.append(json.load(open(path)))
        os.remove(path)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    import s3fs

    os.makedirs(args.out, exist_ok=True)
    url, options, proxy, server = _s3(args)
    fs = s3fs.S3FileSystem(**options)
    base = {"size": args.size_mb << 20, "options": options, "out": args.out, "saves": args.saves}
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            mem = tempfile.mkdtemp(prefix="distckpt-mem-", dir=args.mem)
            row: dict[str, Any] = {}
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for replicas in order:  # the same state, saved with and without a partner copy
                root = f"{url}/r{r}-replicas{replicas}"
                where = os.path.join(mem, f"replicas{replicas}")
                ranks = _launch(base | {"what": "save", "root": root, "mem": where, "replicas": replicas})
                row[f"save_replicas{replicas}"] = max(x["seconds"] for x in ranks)
            root, where = f"{url}/r{r}-replicas1", os.path.join(mem, "replicas1")
            for kind in ["memory", "s3"] if r % 2 == 0 else ["s3", "memory"]:
                job = base | {"what": "restore", "root": root, "replicas": 1}
                job |= {"mem": where, "wipe": 1} if kind == "memory" else {"mem": None}
                ranks = _launch(job, proxy)
                row[f"restore_{kind}"] = {
                    "seconds": max(x["seconds"] for x in ranks),
                    "protected_again": max(x["protected_again"] for x in ranks),
                    "tier": ranks[0]["tier"],
                    "bit_exact": all(x["bit_exact"] for x in ranks),
                    "s3_get_bytes": proxy.served.get("GET", 0),
                    "s3_requests": dict(proxy.requests),
                }
            total = sum(fs.size(p) for p in fs.ls(f"{root}/step_{args.saves + 1:012d}".removeprefix("s3://")))
            row["checkpoint_bytes"] = total
            shutil.rmtree(mem, ignore_errors=True)
            rounds.append(row)
            print(f"round {r + 1}: {_fmt_round(row)}", flush=True)
    finally:
        proxy.close()
        if server is not None:
            server.stop()
    return {"meta": vars(args) | {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, "rounds": rounds,
            "summary": summarize(rounds)}  # fmt: skip


def _fmt_round(row: dict[str, Any]) -> str:
    m, s = row["restore_memory"], row["restore_s3"]
    return (
        f"save to memory {row['save_replicas0']:.3f}s, protected {row['save_replicas1']:.3f}s; "
        f"recovery {m['seconds']:.3f}s ({m['tier']}, S3 served {m['s3_get_bytes']} B), "
        f"from S3 {s['seconds']:.3f}s (S3 served {s['s3_get_bytes'] / 1e6:.1f} MB)"
    )


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    protect = [r["save_replicas1"] / r["save_replicas0"] for r in rounds]
    speedup = [r["restore_s3"]["seconds"] / r["restore_memory"]["seconds"] for r in rounds]
    return {
        "save_memory_s": statistics.median(r["save_replicas0"] for r in rounds),
        "save_protected_s": statistics.median(r["save_replicas1"] for r in rounds),
        "protected_vs_memory": statistics.median(protect),
        "protected_vs_memory_range": [min(protect), max(protect)],
        "recovery_s": statistics.median(r["restore_memory"]["seconds"] for r in rounds),
        "recovery_protected_again_s": statistics.median(r["restore_memory"]["protected_again"] for r in rounds),
        "restore_s3_s": statistics.median(r["restore_s3"]["seconds"] for r in rounds),
        "recovery_speedup_vs_s3": statistics.median(speedup),
        "recovery_speedup_range": [min(speedup), max(speedup)],
        "recovery_s3_get_bytes": max(r["restore_memory"]["s3_get_bytes"] for r in rounds),
        "s3_restore_get_bytes": statistics.median(r["restore_s3"]["s3_get_bytes"] for r in rounds),
        "checkpoint_bytes": rounds[-1]["checkpoint_bytes"],
        "bit_exact": all(r[k]["bit_exact"] for r in rounds for k in ("restore_memory", "restore_s3")),
        "recovery_tier": sorted({r["restore_memory"]["tier"] for r in rounds}),
    }


def report(results: dict[str, Any], out: str) -> list[str]:
    s = results["summary"]
    lines = [
        f"{results['meta']['size_mb']} MB state, 4 ranks as 2 nodes, {len(results['rounds'])} rounds (medians [range])",
        f"time until protected (own memory + partner): {s['save_protected_s']:.3f}s vs own memory alone "
        f"{s['save_memory_s']:.3f}s: {s['protected_vs_memory']:.2f}x "
        f"[{s['protected_vs_memory_range'][0]:.2f}-{s['protected_vs_memory_range'][1]:.2f}] (target <= 1.5x)",
        f"recovery after one node loss: {s['recovery_s']:.3f}s ({', '.join(s['recovery_tier'])}; S3 served "
        f"{s['recovery_s3_get_bytes']} bytes of GETs) vs restoring from S3 {s['restore_s3_s']:.3f}s "
        f"({s['s3_restore_get_bytes'] / 1e6:.1f} MB): {s['recovery_speedup_vs_s3']:.1f}x faster "
        f"[{s['recovery_speedup_range'][0]:.1f}-{s['recovery_speedup_range'][1]:.1f}] (target >= 5x)",
        f"the replaced node's copies and replicas are back (protected again) {s['recovery_protected_again_s']:.3f}s "
        "after the restore began, in the background",
        f"bit-exact: {s['bit_exact']}",
    ]
    json.dump(results, open(os.path.join(out, "memory.json"), "w"), indent=1)
    _chart(s, os.path.join(out, "memory.png"))
    return lines


def _chart(s: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(["own memory", "protected\n(+ partner)"], [s["save_memory_s"], s["save_protected_s"]], color=["C0", "C1"])
    a.set_ylabel("seconds per save")
    a.set_title("save")
    b.bar(["one node lost:\nmemory + replica", "from S3"], [s["recovery_s"], s["restore_s3_s"]], color=["C1", "C2"])
    b.set_ylabel("seconds per restore")
    b.set_title("recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=256, help="the state every rank holds (DDP-like)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--saves", type=int, default=2, help="measured saves per method and round (after a warm-up)")
    p.add_argument("--mem", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="where node memory lives")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--s3-url", default=None, help="a real S3 URL instead of the moto server")
    p.add_argument("--storage-options", default=None, help="JSON storage options for --s3-url")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for line in report(run(args), args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
