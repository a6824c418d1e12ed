"""Save/restore benchmark: distckpt against torch.save and DCP, on one state, in one run.

    python -m benchmarks.save_bench --device cuda --size-gb 20      # the GPU target run
    python -m benchmarks.save_bench --device cpu --size-gb 0.5      # anywhere
    distckpt bench                                                  # sensible defaults

Each contender (and the machine's ceilings) runs in a fresh child process on the same
seeded state, so that memory use and allocator state are its own. With ``--rounds R``
the whole set runs R times, interleaved (the order rotates each round), so that a noisy
disk or neighbour hits every method alike; the table gives medians, every write figure
also as a ratio to the disk ceiling measured in the same round, and the spread. Writes
``<out>/results.json`` and ``<out>/results.png`` and prints a table with ratios against
the best competitor and, on CUDA, the pass/fail of each target in issue #3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any

from .child import run_child

COMPETITORS = (
    "torch.save",
    "dcp.save",
    "dcp.save[threads]",
    "dcp.async_save",
    "dcp.async_save[cached]",
    "dcp.async_save[pinned stager]",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="save_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--size-gb", type=float, default=None, help="training state size (default: 20 on cuda, 0.5 on cpu)")
    p.add_argument("--repeats", type=int, default=3, help="saves per method (the first one is reported apart)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="writer threads")
    p.add_argument("--out", default="bench_out", help="folder for results.json and results.png")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: <out>/work)")
    p.add_argument("--methods", default="all", help="comma-separated subset, or 'all'")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds of the whole set (default: 3 on cpu, 1 on cuda)"
    )
    p.add_argument("--merge", nargs="*", default=None, help="combine earlier results.json files instead of running")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size_gb is None:
        args.size_gb = 20.0 if args.device == "cuda" else 0.5
    if args.rounds is None:
        args.rounds = 1 if args.device == "cuda" else 3
    args.dir = args.dir or os.path.join(args.out, "work")
    return args


def child(args: argparse.Namespace) -> None:
    """Run one method (or the ceilings) in this fresh process and write its JSON."""
    from . import methods as bm

    state = bm.build_state(args.device, int(args.size_gb * 1e9))
    workdir = os.path.join(args.dir, args.child.replace(" ", "_"))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    rss = bm.PeakRSS()
    if args.child == "ceilings":
        result: dict[str, Any] = bm.ceilings(state, workdir, args.threads, args.device)
    else:
        result = bm.methods(args.device)[args.child](state, workdir, args.repeats, args.threads, args.device, rss)
    result["peak_host_bytes"] = rss.stop()
    result["state_bytes"] = bm.state_bytes(state)
    result["tensors"] = sum(len(g) for g in state.values())
    shutil.rmtree(workdir, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(result, f)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from . import methods as bm

    names = list(bm.methods(args.device)) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ["ceilings", *names]}
    os.makedirs(args.out, exist_ok=True)
    for r in range(args.rounds):
        order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]  # nobody always goes first
        round_runs = {name: _run_child(args, name, r) for name in order}
        for name, data in round_runs.items():
            if name != "ceilings":
                data["disk_ceiling_gbps"] = round_runs["ceilings"].get("disk_write_fsync_gbps")
            runs[name].append(data)
    return {
        "meta": _meta(args),
        "ceilings": _combine_ceilings(runs.pop("ceilings")),
        "methods": {name: {"rounds": rs} for name, rs in runs.items()},
    }


def _run_child(args: argparse.Namespace, name: str, r: int) -> dict[str, Any]:
    print(f"round {r + 1}/{args.rounds}: running {name} ...", flush=True)
    return run_child("distckpt.bench.save", name, args.out, _pass_through(args), args.timeout)


def _combine_ceilings(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each ceiling over the rounds, the spread of the disk's, and every round."""
    ok = [c for c in rounds if "error" not in c]
    if not ok:
        return rounds[0] if rounds else {}
    out: dict[str, Any] = {k: statistics.median(c[k] for c in ok) for k in ok[0] if isinstance(ok[0][k], float)}
    disk = [c["disk_write_fsync_gbps"] for c in ok]
    out["disk_write_fsync_gbps_range"] = [min(disk), max(disk)]
    out["rounds"] = rounds
    return out


def _pass_through(args: argparse.Namespace) -> list[str]:
    return [
        "--device",
        args.device,
        "--size-gb",
        str(args.size_gb),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--dir",
        args.dir,
    ]


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import distckpt

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "distckpt": distckpt.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "size_gb": args.size_gb,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "threads": args.threads,
        "checkpoint_dir": os.path.abspath(args.dir),
    }


# --- reporting ---------------------------------------------------------------------------


def summarize(m: dict[str, Any]) -> dict[str, Any]:
    """First-save and steady-state numbers of one method: medians over its rounds, with
    ``<key>_range`` (min, max) where it ran more than once."""
    if "rounds" not in m:
        return _summarize_run(m)
    per = [_summarize_run(r) for r in m["rounds"]]
    if not per or not all(per):
        return {}
    out: dict[str, Any] = {"bit_exact": all(p["bit_exact"] for p in per), "rounds": len(per)}
    for key, value in per[0].items():
        if isinstance(value, float) and all(p.get(key) is not None for p in per):
            values = [p[key] for p in per]
            out[key] = statistics.median(values)
            out[f"{key}_range"] = [min(values), max(values)]
    return out


def _summarize_run(m: dict[str, Any]) -> dict[str, Any]:
    saves = m.get("saves") or []
    if not saves or "error" in m:
        return {}
    later = saves[1:] or saves
    nbytes = m.get("state_bytes", 0)
    total = statistics.median(s["total"] for s in later)
    gbps = nbytes / total / 1e9 if total else 0.0
    ceiling = m.get("disk_ceiling_gbps")
    return {
        "stall_first": saves[0]["stall"],
        "stall_steady": statistics.median(s["stall"] for s in later),
        "stall_max": max(s["stall"] for s in saves),
        "total_first": saves[0]["total"],
        "total_steady": total,
        "gbps_steady": gbps,
        "vs_ceiling": gbps / ceiling if ceiling else None,
        "restore": float(m["restore"]) if m.get("restore") is not None else None,
        "restore_cold": float(m["restore_cold"]) if m.get("restore_cold") is not None else None,
        "host_ratio": m.get("save_peak_host_bytes", 0) / nbytes if nbytes else 0.0,
        "bit_exact": m.get("bit_exact"),
    }


def _spread(s: dict[str, Any], key: str) -> str:
    lo, hi = s.get(f"{key}_range", (None, None))
    return f" ({lo:.2f}-{hi:.2f})" if lo is not None and s.get("rounds", 1) > 1 else ""


def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "method",
            "stall 1st s",
            "stall s",
            "durable s (range)",
            "GB/s",
            "x disk ceiling (range)",
            "restore s",
            "cold s",
            "host mem/state (saving)",
            "bit-exact",
        )
    ]
    for name, m in results["methods"].items():
        s = summarize(m)
        if not s:
            rows.append((name, "error", *[""] * (len(rows[0]) - 2)))
            continue
        rows.append(
            (
                name,
                f"{s['stall_first']:.3f}",
                f"{s['stall_steady']:.3f}",
                f"{s['total_steady']:.2f}{_spread(s, 'total_steady')}",
                f"{s['gbps_steady']:.2f}",
                f"{s['vs_ceiling']:.2f}{_spread(s, 'vs_ceiling')}" if s.get("vs_ceiling") else "-",
                f"{s['restore']:.2f}" if s.get("restore") is not None else "-",
                f"{s['restore_cold']:.2f}" if s.get("restore_cold") is not None else "-",
                f"{s['host_ratio']:.2f}x",
                "yes" if s["bit_exact"] else "NO",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def ratios(results: dict[str, Any]) -> list[str]:
    """distckpt's best against the best competitor, metric by metric."""
    summ = {n: summarize(m) for n, m in results["methods"].items() if summarize(m)}
    ours = {n: s for n, s in summ.items() if n.startswith("distckpt")}
    theirs = {n: s for n, s in summ.items() if n in COMPETITORS}
    lines = []
    for key, label in (("stall_max", "worst stall"), ("total_steady", "time until durable"), ("restore", "restore")):
        a = min(((s[key], n) for n, s in ours.items() if s.get(key)), default=None)
        b = min(((s[key], n) for n, s in theirs.items() if s.get(key)), default=None)
        if a and b:
            lines.append(f"{label}: {a[1]} {a[0]:.3f}s vs best competitor {b[1]} {b[0]:.3f}s -> {b[0] / a[0]:.1f}x")
    return lines


def targets(results: dict[str, Any]) -> list[str]:
    """The targets of issues #3 (GPU) and #16 (writer) that this run can check."""
    summ = {n: summarize(m) for n, m in results["methods"].items() if summarize(m)}
    ceil = results.get("ceilings", {})
    out = []

    def check(label: str, ok: bool, detail: str) -> None:
        out.append(f"[{'PASS' if ok else 'MISS'}] {label}: {detail}")

    ours, shipped = summ.get("distckpt async"), summ.get("dcp.async_save")
    if ours and ceil.get("stage_floor_s"):
        floor = ceil["stage_floor_s"]
        check(
            "stall on every save <= 1.1x the device-to-host floor",
            ours["stall_max"] <= 1.1 * floor,
            f"{ours['stall_max']:.3f}s vs floor {floor:.3f}s",
        )
    if ours and shipped:
        check(
            ">= 30x less stall than dcp.async_save as shipped",
            shipped["stall_max"] / ours["stall_max"] >= 30,
            f"{shipped['stall_max'] / ours['stall_max']:.1f}x",
        )
    if "distckpt async[gpu]" in summ:
        g = summ["distckpt async[gpu]"]
        check("GPU-side snapshot stall <= 30 ms", g["stall_max"] <= 0.030, f"{g['stall_max'] * 1e3:.1f} ms")
    dcp_best = min((s["total_steady"] for n, s in summ.items() if n.startswith("dcp")), default=None)
    if ours and dcp_best:
        check(
            "time until durable <= best DCP configuration",
            ours["total_steady"] <= dcp_best,
            f"{ours['total_steady']:.2f}s vs {dcp_best:.2f}s",
        )
    sync = summ.get("distckpt sync")
    over = ceil.get("disk_overwrite_fsync_gbps")
    for label, s in (("sync", sync), ("async", ours)):
        if s and s.get("vs_ceiling"):
            check(
                f"{label}: write throughput >= 0.9x the disk's write+fsync ceiling (same round)",
                s["vs_ceiling"] >= 0.9,
                f"{s['vs_ceiling']:.2f}x{_spread(s, 'vs_ceiling')}, {s['gbps_steady']:.2f} GB/s"
                + (
                    f"; {s['gbps_steady'] / over:.2f}x the ceiling over existing files ({over:.2f} GB/s)"
                    if over
                    else ""
                ),
            )
    at_once = summ.get("distckpt async[at once]")
    for label, s in (("pool reserved", ours), ("right after construction", at_once)):
        if s:
            check(
                f"first save's stall <= 1.2x later saves' ({label})",
                s["stall_first"] <= 1.2 * s["stall_steady"],
                f"{s['stall_first']:.3f}s vs {s['stall_steady']:.3f}s: {s['stall_first'] / s['stall_steady']:.2f}x",
            )
    if ours:
        _restore_and_memory_targets(results, summ, ours, check)
    return out


def _restore_and_memory_targets(
    results: dict[str, Any], summ: dict[str, Any], ours: dict[str, Any], check: Any
) -> None:
    ran = results["methods"]["distckpt async"]
    ran = ran["rounds"][-1] if "rounds" in ran else ran
    dl = summ.get("dcp.save", {}).get("restore")
    if dl:
        # what the machine allows: reading the state's bytes from the page cache into memory
        # of their own, on as many threads as the run uses (same round, median of rounds)
        ceiling = _best(results.get("ceilings", {}), "page_cache_read")
        nbytes = ran.get("state_bytes", 0)
        limit = f"; the page-cache read ceiling allows {dl * ceiling * 1e9 / nbytes:.1f}x" if ceiling and nbytes else ""
        check(
            "restore >= 5x faster than dcp.load",
            dl / ours["restore"] >= 5,
            f"{dl / ours['restore']:.1f}x ({ours['restore']:.2f}s vs {dl:.2f}s){limit}",
        )
    disk = _best(results.get("ceilings", {}), "disk_read")
    cold = summ.get("distckpt async", {}).get("restore_cold")
    if disk and cold and ran.get("state_bytes"):
        gbps = ran["state_bytes"] / cold / 1e9
        check(
            "cold restore >= 0.9x the disk's read ceiling (verified, files evicted from the page cache)",
            gbps >= 0.9 * disk,
            f"{gbps / disk:.2f}x ({gbps:.2f} GB/s vs {disk:.2f} GB/s, {cold:.2f}s)",
        )
    staging = ran.get("staging_bytes", 0) / ran["state_bytes"]
    check("staging memory <= 1.1x the state", staging <= 1.1, f"{staging:.3f}x")


def chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summ = {n: summarize(m) for n, m in results["methods"].items() if summarize(m)}
    names = list(summ)
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.45 * len(names) + 2.2))
    panels = (
        ("stall_max", "training stall per save, worst (s, log)", True),
        ("total_steady", "time until durable (s)", False),
        ("restore", "restore, warm page cache (s)", False),
    )
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        values = [summ[n].get(key) or 0 for n in names]
        colors = ["tab:green" if n.startswith("distckpt") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        ax.set_title(title)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    m = results["meta"]
    fig.suptitle(f"{m['size_gb']} GB state on {m['device']} ({m['device_name']}), torch {m['torch']}, {m['date']}")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best(ceilings: dict[str, Any], prefix: str) -> float:
    """The best of a ceiling over thread counts (``<prefix>_gbps_t<n>``)."""
    return max((v for k, v in ceilings.items() if k.startswith(prefix) and isinstance(v, float)), default=0.0)


def report(results: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    chart(results, os.path.join(out, "results.png"))
    m = results["meta"]
    print(f"\n{m['size_gb']} GB state, {m['device']} ({m['device_name']}), torch {m['torch']}, {m['date']}")
    c = results.get("ceilings", {})
    if "stage_floor_s" in c:
        lo, hi = c.get("disk_write_fsync_gbps_range", (c["disk_write_fsync_gbps"],) * 2)
        print(
            f"ceilings (median of {m.get('rounds', 1)} rounds): copy to host {c['stage_gbps']:.1f} GB/s "
            f"({c['stage_floor_s']:.3f}s for the state), disk write+fsync {c['disk_write_fsync_gbps']:.2f} GB/s "
            f"(rounds {lo:.2f}-{hi:.2f}; over existing files {c.get('disk_overwrite_fsync_gbps', 0):.2f} GB/s), read from the page cache {_best(c, 'page_cache_read'):.2f} GB/s, "
            f"from the disk {_best(c, 'disk_read'):.2f} GB/s"
        )
    print(table(results))
    for line in ratios(results) + targets(results):
        print(line)
    print(f"wrote {os.path.join(out, 'results.json')} and results.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.merge:
        results: dict[str, Any] = {"meta": {}, "ceilings": {}, "methods": {}}
        for path in args.merge:
            part = json.load(open(path))
            results["meta"] = results["meta"] or part["meta"]
            results["ceilings"] = results["ceilings"] or part.get("ceilings", {})
            results["methods"].update(part["methods"])
    else:
        results = run_all(args)
    report(results, args.out)
    bad = [n for n, m in results["methods"].items() if "error" in m or m.get("bit_exact") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
