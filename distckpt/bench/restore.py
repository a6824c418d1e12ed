"""Restore at scale: what storage serves per restore, and how long it takes, at 1, 2 and 4 ranks.

    python -m benchmarks.restore_bench --size-gb 0.25 --ranks 1,2,4

A DDP-like state (every rank holds the same tensors: a model plus two Adam moments) is saved
by 2 ranks, in chief and in sharded mode, to local disk and to S3 (a moto server on
127.0.0.1, or ``--s3-url``/``--storage-options`` for a real endpoint), then restored by each
number of ranks, every rank in its own process (gloo). Counted outside distckpt: on local
disk the bytes the rank processes passed through ``read()`` (``rchar``; gloo's sockets do
not count), on S3 the response bytes and requests the server sent through ``S3Proxy``.
``dcp.load`` of the same step by the same ranks is the reference: today's DCP reads a
replicated tensor once per rank. Times are from a warm page cache on local disk. Writes
``<out>/restore.json`` and ``<out>/restore.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any


def _state(size_bytes: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    per = size_bytes // 3 // 4  # fp32 numbers per group
    sizes = [per // 2, per // 4, per // 8, per // 16, per // 16]  # a few big tensors and smaller ones
    model = {f"layer{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    return {
        "model": model,
        "exp_avg": {k: torch.randn(v.shape, generator=g) for k, v in model.items()},
        "exp_avg_sq": {k: torch.rand(v.shape, generator=g) for k, v in model.items()},
    }


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _rank_main(rank: int, world: int, store: str, job: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import distckpt

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    state = _state(job["size"], seed=0)
    options = job.get("options")
    out: dict[str, Any] = {}
    if job["what"] == "save":
        with distckpt.Checkpointer(job["root"], state, mode=job["mode"], storage_options=options) as ckpt:
            ckpt.save(1).wait()
    else:
        target = {k: {n: torch.zeros_like(t) for n, t in g.items()} for k, g in state.items()}

        def once() -> tuple[float, int, Any]:
            dist.barrier()
            before, t0 = _rchar(), time.perf_counter()
            if job["what"] == "dcp.load":
                flat = {f"{k}.{n}": t for k, g in target.items() for n, t in g.items()}
                dcp.load(flat, checkpoint_id=job["stepdir"], no_dist=job["mode"] == "chief")
                counts = None
            else:
                ckpt.restore()
                counts = ckpt._parts.restorer.last_read[rank]
            seconds = time.perf_counter() - t0
            return seconds, _rchar() - before, counts

        ckpt = None
        if job["what"] == "distckpt":
            ckpt = distckpt.Checkpointer(job["root"], target, mode=job["mode"], storage_options=options)
        if job.get("warm"):
            once()  # imports, page cache
        seconds, rchar, counts = once()
        dist.barrier()
        out = {"seconds": seconds, "rchar": rchar}
        if counts is not None:
            out |= {"bytes": counts.bytes, "broadcast_bytes": counts.broadcast_bytes, "files": counts.files}
        out["bit_exact"] = all(torch.equal(target[k][n], t) for k, g in state.items() for n, t in g.items())
        if ckpt is not None:
            ckpt.close()
    with open(os.path.join(job["out"], f".rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _launch(world: int, job: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "store"), job), nprocs=world, join=True)
    results = []
    for r in range(world):
        path = os.path.join(job["out"], f".rank{r}.json")
        results.append(json.load(open(path)))
        os.remove(path)
    return results


def _s3(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any, Any]:
    """(url, storage options through the counting proxy, proxy, server to stop)."""
    import s3fs

    from .s3proxy import S3Proxy

    server = None
    if args.s3_url:
        url, options = args.s3_url.rstrip("/"), json.loads(args.storage_options or "{}")
        endpoint = options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
    else:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"key": "bench", "secret": "bench"}
        s3fs.S3FileSystem(endpoint_url=endpoint, **options).mkdir("restore-bench")
        url = "s3://restore-bench/run"
    proxy = S3Proxy(endpoint)
    return url, dict(options, endpoint_url=proxy.endpoint), proxy, server


def run(args: argparse.Namespace) -> dict[str, Any]:
    import s3fs

    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"meta": vars(args) | {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, "runs": []}
    url, options, proxy, server = _s3(args) if args.s3 else (None, None, None, None)
    try:
        for storage in ["local"] + (["s3"] if args.s3 else []):
            size = int((args.size_gb if storage == "local" else args.s3_size_gb) * 1e9)
            for mode in ("chief", "sharded"):
                local_root = os.path.join(args.dir, mode)
                root = local_root if storage == "local" else f"{url}/{mode}"
                opts = options if storage == "s3" else None
                if storage == "local":
                    shutil.rmtree(local_root, ignore_errors=True)
                else:
                    fs = s3fs.S3FileSystem(**options)
                    if fs.exists(root):
                        fs.rm(root, recursive=True)
                print(f"{storage}/{mode}: saving {size / 1e9:.2f} GB with 2 ranks ...", flush=True)
                base = {"size": size, "mode": mode, "root": root, "options": opts, "out": args.out}
                _launch(2, base | {"what": "save"})
                stepdir = f"{root}/step_{1:012d}"
                if storage == "local":
                    total = sum(os.path.getsize(os.path.join(stepdir, f)) for f in os.listdir(stepdir))
                else:
                    fs = s3fs.S3FileSystem(**options)
                    total = sum(fs.size(p) for p in fs.ls(stepdir.removeprefix("s3://")))
                methods = ["distckpt"] + (["dcp.load"] if storage == "local" else [])
                for world in args.ranks:
                    for what in methods:
                        if proxy is not None:
                            proxy.reset()
                        per_rank = _launch(world, base | {"what": what, "stepdir": stepdir, "warm": storage == "local"})
                        row = _row(storage, mode, what, world, total, per_rank, proxy if storage == "s3" else None)
                        results["runs"].append(row)
                        print(_fmt(row), flush=True)
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.stop()
    return results


def _row(
    storage: str, mode: str, what: str, world: int, total: int, per_rank: list[dict[str, Any]], proxy: Any
) -> dict:
    row: dict[str, Any] = {"storage": storage, "mode": mode, "method": what, "ranks": world, "checkpoint_bytes": total}
    row["seconds"] = max(r["seconds"] for r in per_rank)  # the restore ends when the slowest rank is done
    row["bit_exact"] = all(r["bit_exact"] for r in per_rank)
    if proxy is not None:
        row["served_bytes"] = sum(proxy.served.values())
        row["requests"] = dict(proxy.requests)
    else:
        row["served_bytes"] = sum(r["rchar"] for r in per_rank)
    row["served_x"] = row["served_bytes"] / total
    row["broadcast_bytes"] = sum(r.get("broadcast_bytes", 0) for r in per_rank)
    return row


def _fmt(row: dict[str, Any]) -> str:
    req = " ".join(f"{k}={v}" for k, v in sorted(row.get("requests", {}).items()))
    return (
        f"  {row['storage']:5} {row['mode']:7} {row['method']:8} {row['ranks']} ranks: {row['seconds']:6.2f}s, "
        f"storage served {row['served_x']:.2f}x the checkpoint{', ' + req if req else ''}"
        + ("" if row["bit_exact"] else "  NOT BIT-EXACT")
    )


def report(results: dict[str, Any], out: str) -> list[str]:
    lines = ["storage mode    method   ranks  seconds  served/checkpoint  requests"]
    for row in results["runs"]:
        req = " ".join(f"{k}={v}" for k, v in sorted(row.get("requests", {}).items()))
        lines.append(
            f"{row['storage']:7} {row['mode']:7} {row['method']:8} {row['ranks']:5}  {row['seconds']:7.2f}  "
            f"{row['served_x']:17.2f}  {req}"
        )
    ours = [r for r in results["runs"] if r["method"] == "distckpt"]
    if ours:
        worst = max(ours, key=lambda r: r["served_x"])
        lines.append(
            f"distckpt, worst case: {worst['served_x']:.2f}x the checkpoint ({worst['storage']}, {worst['mode']}, "
            f"{worst['ranks']} ranks); target <= 1.1x"
        )
    for mode in ("chief", "sharded"):
        d = {r["ranks"]: r for r in results["runs"] if r["storage"] == "local" and r["mode"] == mode}
        dcp_ = {r["ranks"]: r for r in results["runs"] if r["method"] == "dcp.load" and r["mode"] == mode}
        ours_ = {k: r for k, r in d.items() if r["method"] == "distckpt"}
        for k in sorted(set(ours_) & set(dcp_)):
            lines.append(
                f"local {mode}, {k} ranks: restore {dcp_[k]['seconds'] / ours_[k]['seconds']:.1f}x faster than "
                f"dcp.load ({ours_[k]['seconds']:.2f}s vs {dcp_[k]['seconds']:.2f}s)"
            )
    with open(os.path.join(out, "restore.json"), "w") as f:
        json.dump(results, f, indent=1)
    _chart(results, os.path.join(out, "restore.png"))
    return lines


def _chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in results["runs"]:
        series.setdefault(f"{row['method']} ({row['storage']}, {row['mode']})", []).append(
            (row["ranks"], row["served_x"])
        )
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label, linestyle="-" if label.startswith("distckpt") else "--")
    ax.set_xlabel("ranks restoring")
    ax.set_ylabel("bytes served by storage / checkpoint size")
    ax.set_xticks(sorted({r["ranks"] for r in results["runs"]}))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="restore_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gb", type=float, default=0.25, help="state size on local disk")
    p.add_argument("--s3-size-gb", type=float, default=0.05, help="state size on S3 (moto serves ~60 MB/s)")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated numbers of restoring ranks")
    p.add_argument("--no-s3", dest="s3", action="store_false", help="local disk only")
    p.add_argument("--s3-url", default=None, help="a real endpoint instead of moto: s3://bucket/prefix")
    p.add_argument("--storage-options", default=None, help="JSON for s3fs (endpoint_url, key, secret, ...)")
    p.add_argument("--out", default="bench_out/restore")
    p.add_argument("--dir", default=None, help="where local checkpoints go (default: <out>/work)")
    args = p.parse_args(argv)
    args.ranks = [int(r) for r in str(args.ranks).split(",")]
    args.dir = args.dir or os.path.join(args.out, "work")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    for line in report(results, args.out):
        print(line)
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0 if all(r["bit_exact"] for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
