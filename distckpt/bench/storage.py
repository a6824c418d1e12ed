"""Save/restore throughput per storage backend: local disk, S3, and a local tier in front of S3.

    python -m benchmarks.storage_bench                       # S3 = a moto server on 127.0.0.1
    python -m benchmarks.storage_bench --s3-url s3://bucket/prefix \\
        --storage-options '{"endpoint_url": "https://minio.example:9000"}'   # a real endpoint

Every number is GB/s (1e9 bytes) of the training state over wall time: a synchronous save
until committed, a restore until the tensors are back (checked bit for bit). For the local
tier, "save" is the local commit and "upload" runs until the step is committed on S3.
Writes ``<out>/storage.json`` and ``<out>/storage.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import torch

import distckpt

GB = 1e9


def _state(nbytes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = max(1, nbytes // 4 // 16)
    return {f"t{i}": torch.randn(n, generator=g) for i in range(16)}


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(
    url: str, state: dict[str, torch.Tensor], opts: dict[str, Any] | None, local_dir: str | None = None
) -> dict[str, float]:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    out: dict[str, float] = {"bytes": nbytes}
    with distckpt.Checkpointer(
        url, {"state": state}, storage_options=opts, local_dir=local_dir, write_threads=4
    ) as ckpt:
        t0 = time.perf_counter()
        ckpt.save(1)
        out["save_gbps"] = nbytes / (time.perf_counter() - t0) / GB
        if local_dir:
            ckpt.wait()  # until the upload is committed remotely
            out["upload_gbps"] = nbytes / (time.perf_counter() - t0) / GB
    for tier_label, drop_local in (("restore", False), ("restore_remote", True)):
        if drop_local and not local_dir:
            continue
        if drop_local:
            shutil.rmtree(local_dir, ignore_errors=True)
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        with distckpt.Checkpointer(
            url, {"state": target}, storage_options=opts, local_dir=local_dir, read_only=True
        ) as reader:
            seconds = _timed(reader.restore)
        if not all(torch.equal(target[k], v) for k, v in state.items()):
            raise AssertionError(f"{url}: restore is not bit-exact")
        out[f"{tier_label}_gbps"] = nbytes / seconds / GB
    return out


def _moto() -> tuple[Any, dict[str, Any]]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        sys.exit("no --s3-url given and moto is not installed: pip install 'moto[server]', or point at a real endpoint")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="storage_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gb", type=float, default=0.2)
    p.add_argument("--s3-url", default=None, help="an S3 prefix to write under (default: a local moto server)")
    p.add_argument("--storage-options", default="{}", help="JSON for s3fs (endpoint_url, key, secret, ...)")
    p.add_argument("--dir", default=None, help="local directory for the disk and local-tier runs")
    p.add_argument("--out", default="bench_out/storage")
    args = p.parse_args(argv)
    state = _state(int(args.size_gb * GB))
    server = None
    opts = json.loads(args.storage_options)
    if args.s3_url is None:
        import s3fs

        server, opts = _moto()
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(**opts).mkdir(bucket)
        s3_url = f"s3://{bucket}"
    else:
        s3_url = args.s3_url.rstrip("/")
    run = uuid.uuid4().hex[:8]
    base = args.dir or tempfile.mkdtemp(prefix="distckpt-storage-bench-")
    results: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "size_gb": args.size_gb,
            "s3": "moto (local)" if server else s3_url,
            "torch": torch.__version__,
        },
        "backends": {},
    }
    try:
        results["backends"]["local disk"] = measure(os.path.join(base, f"disk-{run}"), state, None)
        results["backends"]["s3"] = measure(f"{s3_url}/s3-{run}", state, opts)
        results["backends"]["local tier + s3"] = measure(
            f"{s3_url}/tier-{run}", state, opts, local_dir=os.path.join(base, f"tier-{run}")
        )
    finally:
        if server is not None:
            server.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    report(results, args.out)
    return 0


def report(results: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "storage.json"), "w") as f:
        json.dump(results, f, indent=1)
    cols = ("save_gbps", "upload_gbps", "restore_gbps", "restore_remote_gbps")
    print(f"{results['meta']['size_gb']} GB state, S3: {results['meta']['s3']}  (GB/s)")
    print(f"{'backend':18}" + "".join(f"{c.removesuffix('_gbps'):>16}" for c in cols))
    for name, r in results["backends"].items():
        print(f"{name:18}" + "".join(f"{r[c]:16.3f}" if c in r else f"{'-':>16}" for c in cols))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    names = list(results["backends"])
    width = 0.2
    for i, c in enumerate(cols):
        ax.bar(
            [j + i * width for j in range(len(names))],
            [results["backends"][n].get(c, 0) for n in names],
            width,
            label=c.removesuffix("_gbps"),
        )
    ax.set_xticks([j + 1.5 * width for j in range(len(names))], names)
    ax.set_ylabel("GB/s")
    ax.set_title(
        f"distckpt throughput per backend, {results['meta']['size_gb']} GB state (S3: {results['meta']['s3']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "storage.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'storage.json')} and storage.png")


if __name__ == "__main__":
    sys.exit(main())
