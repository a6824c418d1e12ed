"""Cost per tensor: states of many small tensors (by default 10,000 and 100,000 of 1 KB).

    python -m benchmarks.tensors_bench --counts 10000,100000 --rounds 3

A mixture-of-experts state holds ~190k tensors, so per-item work (planning, framing,
bookkeeping, manifest entries) must not dominate a save or a restore. Per count and round,
each method runs in a fresh process (interleaved; the order rotates each round):
``torch.save`` + fsync and ``torch.load`` of the dict, ``dcp.save`` and ``dcp.load``, and a
synchronous distckpt save (its first save plans with DCP; later ones reuse the plan) and
restore, and the background saves of both (``dcp.async_save``, ``distckpt async``), whose
stall - the time training waits in ``save()`` - is reported apart. Reported: medians and
spread of the time until durable and of the restore, as ratios to ``torch.save`` /
``torch.load`` of the same dict in the same round, the stall, and the cost per tensor at
each count (linear growth keeps it flat). Writes ``<out>/tensors.json`` and
``<out>/tensors.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

from .child import run_child

METHODS = ("torch.save", "dcp.save", "dcp.async_save", "distckpt sync", "distckpt async")


def _state(count: int, nbytes: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(count)
    return {f"layer{i // 8}.expert{i % 8}": torch.randn(nbytes // 4, generator=g) for i in range(count)}


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def child(args: argparse.Namespace) -> None:
    """One method at one count: ``--saves`` saves (the first reported apart), one restore."""
    import torch
    import torch.distributed.checkpoint as dcp

    import distckpt

    state = _state(args.count, args.tensor_bytes)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    work = os.path.join(args.dir, args.child.replace(" ", "_").replace(".", "_"))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    saves: list[float] = []
    stalls: list[float] = []  # background saves: the time save() blocked

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if args.child == "torch.save":
        path = os.path.join(work, "state.pt")
        for _ in range(args.saves):
            saves.append(timed(lambda: (torch.save(state, path), _fsync(path))))
        restore = timed(lambda: target.update(torch.load(path, weights_only=True)))
    elif args.child == "dcp.save":
        for i in range(args.saves):
            saves.append(timed(lambda i=i: dcp.save(state, checkpoint_id=os.path.join(work, str(i)), no_dist=True)))
        last = os.path.join(work, str(args.saves - 1))
        restore = timed(lambda: dcp.load(target, checkpoint_id=last, no_dist=True))
    elif args.child == "dcp.async_save":
        for i in range(args.saves):
            t0 = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=os.path.join(work, str(i)), no_dist=True)
            stalls.append(time.perf_counter() - t0)
            future.result()
            saves.append(time.perf_counter() - t0)
        last = os.path.join(work, str(args.saves - 1))
        restore = timed(lambda: dcp.load(target, checkpoint_id=last, no_dist=True))
    elif args.child in ("distckpt sync", "distckpt async"):
        background = args.child == "distckpt async"
        keep = distckpt.Keep(last=1)
        with distckpt.Checkpointer(work, {"state": state}, async_save=background, keep=keep) as ckpt:
            getattr(ckpt._parts.saves.stager, "wait_reserved", lambda: None)()  # built long before the first save
            for step in range(1, args.saves + 1):
                t0 = time.perf_counter()
                handle = ckpt.save(step)
                stalls.append(time.perf_counter() - t0)
                handle.wait()
                saves.append(time.perf_counter() - t0)
        with distckpt.Checkpointer(work, {"state": target}) as reader:
            restore = timed(reader.restore)
    else:
        raise SystemExit(f"unknown method {args.child!r}; one of {', '.join(METHODS)}")
    exact = all(torch.equal(target[k], v) for k, v in state.items())
    shutil.rmtree(work, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump({"saves": saves, "stalls": stalls or saves, "restore": restore, "bit_exact": exact}, f)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {str(c): {n: [] for n in names} for c in args.counts}
    os.makedirs(args.out, exist_ok=True)
    for r in range(args.rounds):
        for count in args.counts:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                print(f"round {r + 1}/{args.rounds}: {count} tensors, {name} ...", flush=True)
                argv = ["--count", str(count), "--tensor-bytes", str(args.tensor_bytes), "--saves", str(args.saves)]
                argv += ["--dir", args.dir]
                runs[str(count)][name].append(
                    run_child("distckpt.bench.tensors", name, args.out, argv, args.timeout) | {"round": r}
                )
    return {"meta": {"tensor_bytes": args.tensor_bytes, "rounds": args.rounds, "saves": args.saves}, "runs": runs}


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per count and method: medians (and min-max) of first save, later saves, restore, and
    of their ratios to torch.save / torch.load in the same round."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for count, by_method in results["runs"].items():
        base = {r["round"]: r for r in by_method.get("torch.save", []) if "error" not in r}
        out[count] = {}
        for name, rs in by_method.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                out[count][name] = {"error": rs[0]["error"][0] if rs else "not run"}
                continue
            rows = []
            for r in ok:
                stalls = r.get("stalls", r["saves"])
                row = {"first": r["saves"][0], "save": statistics.median(r["saves"][1:] or r["saves"]),
                       "stall": statistics.median(stalls[1:] or stalls), "restore": r["restore"]}  # fmt: skip
                if r["round"] in base:
                    b = base[r["round"]]
                    row["save_x"] = row["save"] / statistics.median(b["saves"][1:] or b["saves"])
                    row["restore_x"] = row["restore"] / b["restore"]
                rows.append(row)
            s: dict[str, Any] = {"bit_exact": all(r["bit_exact"] for r in ok), "rounds": len(ok)}
            for key in rows[0]:
                values = [row[key] for row in rows if key in row]
                s[key], s[f"{key}_range"] = statistics.median(values), [min(values), max(values)]
            s["us_per_tensor"] = s["save"] / int(count) * 1e6
            out[count][name] = s
    return out


def report(results: dict[str, Any], out: str) -> list[str]:
    summ = results["summary"] = summarize(results)
    lines = [
        f"{results['meta']['rounds']} rounds, tensors of {results['meta']['tensor_bytes']} bytes; "
        "x = ratio to torch.save / torch.load of the same dict in the same round (median, min-max)",
        f"{'tensors':>8} {'method':14} {'1st save s':>10} {'save s':>8} {'x torch.save':>20} {'stall s':>8} "
        f"{'restore s':>9} {'x torch.load':>20} {'us/tensor':>9}",
    ]

    def x(s: dict[str, Any], key: str) -> str:
        lo, hi = s.get(f"{key}_range", (None, None))
        return f"{s[key]:.2f} ({lo:.2f}-{hi:.2f})" if key in s else "-"

    for count, by_method in summ.items():
        for name, s in by_method.items():
            if "error" in s:
                lines.append(f"{count:>8} {name:14} error: {s['error']}")
                continue
            lines.append(
                f"{count:>8} {name:14} {s['first']:10.2f} {s['save']:8.2f} {x(s, 'save_x'):>20} {s['stall']:8.3f} "
                f"{s['restore']:9.2f} {x(s, 'restore_x'):>20} {s['us_per_tensor']:9.1f}"
                + ("" if s["bit_exact"] else "  NOT BIT-EXACT")
            )
    counts = list(summ)
    for name in METHODS:
        cost = [summ[c].get(name, {}).get("us_per_tensor") for c in counts]
        if len(counts) > 1 and all(cost):
            lines.append(
                f"{name}: cost per tensor at {counts[-1]} vs {counts[0]} tensors: {cost[-1] / cost[0]:.2f}x "
                "(1.0 = linear growth)"
            )
    with open(os.path.join(out, "tensors.json"), "w") as f:
        json.dump(results, f, indent=1)
    _chart(summ, os.path.join(out, "tensors.png"))
    return lines


def _chart(summ: dict[str, dict[str, dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("save", "save until durable (s)"),
        ("stall", "training blocked per save (s)"),
        ("restore", "restore (s)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        xs, labels = [], []
        for i, (count, by_method) in enumerate(summ.items()):
            names = [n for n, s in by_method.items() if "error" not in s]
            at = [j + i * (len(names) + 1) for j in range(len(names))]
            ax.bar(at, [by_method[n][key] for n in names],
                   color=["tab:green" if n.startswith("distckpt") else "tab:gray" for n in names])  # fmt: skip
            xs += at
            labels += [f"{n} ({int(count) // 1000}k)" for n in names]
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tensors_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--counts", default="10000,100000", help="comma-separated numbers of tensors")
    p.add_argument("--tensor-bytes", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--saves", type=int, default=3, help="saves per run (the first is reported apart)")
    p.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--out", default="bench_out/tensors")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: <out>/work)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.counts = [int(c) for c in str(args.counts).split(",")]
    args.dir = args.dir or os.path.join(args.out, "work")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    results = run(args)
    for line in report(results, args.out):
        print(line)
    bad = [(c, n) for c, ms in results["summary"].items() for n, s in ms.items() if s.get("bit_exact") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
