"""Training time lost per save: the stall plus how much the save slows the training loop beside it.

    python -m benchmarks.overlap_bench --size-gb 0.5 --rounds 3     # every method, in one run

The number users feel is not the stall alone: a background save competes with training for
the CPU (and the GIL). Every method saves the state of a real training loop (an MLP with
Adam, one intra-op thread, as a data loader or a GPU job leaves the other cores to
everything else) in a fresh process. Per round: the loop's step time is measured first
(the baseline, median of 5 steps), then one save starts and training goes on until the save
is durable; *lost* = stall + the sum over the steps that ran meanwhile of (step time -
baseline). The stall floor is a plain copy of the state into memory that is already faulted
in. The first save of each process comes right after distckpt's Checkpointer is built
(its staging pool not faulted in yet) and is reported apart ("1st stall", "1st lost").
``distckpt async[overlap]`` is ``snapshot="overlap"``: the optimizer's part of the copy
runs beside the next forward and backward, its step waits for the rest. Methods run interleaved round by round, so drift hits them alike; medians and the
spread (min-max) are reported; ``--saves k`` measures k saves per process (after the first
two), for more samples per round. Writes ``<out>/overlap.json`` and ``<out>/overlap.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from .child import run_child

METHODS = (
    "torch.save",
    "dcp.save",
    "dcp.async_save",
    "dcp.async_save[process]",
    "distckpt async",
    "distckpt async[overlap]",
    "distckpt async[threads]",
    "distckpt async[buffered]",
    "distckpt async[1 copy thread]",
    "distckpt async[new files]",
)


def _model(size_bytes: int) -> tuple[Any, Any, Any]:
    import torch

    width = 1024
    layers = max(1, round(size_bytes / 12 / (width * width)))  # fp32 weights + Adam's two moments
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(16, width)
    return model, optim, x


def _step(model: Any, optim: Any, x: Any) -> None:
    loss = model(x).square().mean()
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=False)


class _Save:
    """A save in progress: ``done()`` once durable."""

    def __init__(self, done: Callable[[], bool], wait: Callable[[], Any]) -> None:
        self.done, self.wait = done, wait


def _savers(model: Any, optim: Any, workdir: str) -> tuple[dict[str, Callable[[int], _Save]], Callable[[str], None]]:
    """``({method: save(i)}, prepare(method))``; ``prepare`` builds distckpt's Checkpointer
    (a no-op for the others), so that the first save comes right after construction."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import distckpt

    finished = _Save(lambda: True, lambda: None)

    def state() -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optim)
        return {"model": model_sd, "optim": optim_sd}

    def torch_save(i: int) -> _Save:
        path = os.path.join(workdir, f"torch_{i}.pt")
        torch.save(state(), path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return finished

    def dcp_save(i: int) -> _Save:
        dcp.save(state(), checkpoint_id=os.path.join(workdir, f"dcp_{i}"), no_dist=True)
        return finished

    def dcp_async(i: int, process: bool = False) -> _Save:
        kwargs: dict[str, Any] = {"checkpoint_id": os.path.join(workdir, f"dcpa_{i}")}
        if process:  # DCP's process mode needs a process group, even for one rank
            import torch.distributed as dist
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            if not dist.is_initialized():
                store = os.path.join(workdir, "pg_store")
                dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
            kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
        else:
            kwargs["no_dist"] = True
        future = dcp.async_save(state(), **kwargs)
        return _Save(future.done, future.result)

    ckpt: list[Any] = []

    def prepare(method: str) -> None:
        if method.startswith("distckpt"):
            ckpt.append(
                distckpt.Checkpointer(
                    os.path.join(workdir, "distckpt"),
                    {"model": model, "optim": optim},
                    async_save=True,
                    keep=distckpt.Keep(last=1),
                    snapshot="overlap" if method.endswith("[overlap]") else "now",
                )
            )

    def ours(i: int) -> _Save:
        handle = ckpt[0].save(i)
        return _Save(handle.done, handle.wait)

    savers = {
        "torch.save": torch_save,
        "dcp.save": dcp_save,
        "dcp.async_save": dcp_async,
        "dcp.async_save[process]": lambda i: dcp_async(i, process=True),
        "distckpt async": ours,
        "distckpt async[overlap]": ours,  # the optimizer's part copied beside the next forward/backward
        "distckpt async[threads]": ours,  # written by threads of this process (see child())
        "distckpt async[buffered]": ours,  # the writer process, through the page cache (see child())
        "distckpt async[1 copy thread]": ours,  # the staging copy on the training thread alone (see child())
        "distckpt async[new files]": ours,  # new files every save, deleted steps' not written over (see child())
    }
    return savers, prepare


def _stall_floor(model: Any, optim: Any) -> float:
    """A plain copy of every tensor of the state into memory that is already faulted in."""
    import torch

    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for s in optim.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    dst = [torch.empty_like(t) for t in tensors]
    for d, t in zip(dst, tensors, strict=True):
        d.copy_(t)
    t0 = time.perf_counter()
    for d, t in zip(dst, tensors, strict=True):
        d.copy_(t)
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    """One method, ``--rounds`` measured saves (after one warm-up save), in this fresh process."""
    import torch

    torch.set_num_threads(1)
    if args.child.endswith("[threads]"):  # the writer threads of before the writer process
        os.environ["DISTCKPT_WRITE_PROCESS"] = "0"
    if args.child.endswith("[buffered]"):  # the writer process without O_DIRECT
        os.environ["DISTCKPT_DIRECT_IO"] = "0"
    if args.child.endswith("[1 copy thread]"):  # the staging copy as before it used threads
        os.environ["DISTCKPT_COPY_THREADS"] = "1"
    if args.child.endswith("[new files]"):  # as before saves wrote over the deleted steps' files
        os.environ["DISTCKPT_RECYCLE"] = "0"
    model, optim, x = _model(int(args.size_gb * 1e9))
    for _ in range(3):
        _step(model, optim, x)
    workdir = os.path.join(args.dir, args.child.replace(" ", "_").replace("[", "_").replace("]", ""))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    savers, prepare = _savers(model, optim, workdir)
    save = savers[args.child]
    out: dict[str, Any] = {"stall_floor": _stall_floor(model, optim), "rounds": []}
    prepare(args.child)
    # the first save, right after construction (a process to spawn, a pool still being
    # faulted in), beside training; reported apart
    first = _beside_training(model, optim, x, lambda: save(0))
    # and one more: from the third save on, a job keeping its last step writes over the files
    # of the step deleted after the second (``layout/recycle.py``): the steady state is measured
    save(1).wait()
    for i in range(2, args.rounds + 2):
        out["rounds"].append(_round(model, optim, x, lambda i=i: save(i)))
    baseline = statistics.median(r["baseline"] for r in out["rounds"])
    first["extra"] = sum(first.pop("during")) - baseline * first["steps"]
    first["lost"] = first["stall"] + first["extra"]
    out["first"] = first
    out["first_save"] = first["durable"]
    out["state_bytes"] = sum(p.numel() * 4 * 3 for p in model.parameters())
    shutil.rmtree(workdir, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(out, f)


def _round(model: Any, optim: Any, x: Any, start: Callable[[], _Save]) -> dict[str, float]:
    """One save beside training. The baseline step time is the median of 5 steps before and
    5 after the save (so that drift during the round cancels out)."""
    steps = [_timed_step(model, optim, x) for _ in range(5)]
    out = _beside_training(model, optim, x, start)
    steps += [_timed_step(model, optim, x) for _ in range(5)]
    out["baseline"] = baseline = statistics.median(steps)
    out["extra"] = sum(out.pop("during")) - baseline * out["steps"]
    out["lost"] = out["stall"] + out["extra"]
    return out


def _beside_training(model: Any, optim: Any, x: Any, start: Callable[[], _Save]) -> dict[str, Any]:
    """Start a save, train until it is durable: the stall, the steps' times, until durable."""
    t0 = time.perf_counter()
    pending = start()
    stall = time.perf_counter() - t0
    during = []
    while not pending.done():
        during.append(_timed_step(model, optim, x))
    pending.wait()
    return {"stall": stall, "during": during, "steps": len(during), "durable": time.perf_counter() - t0}


def _timed_step(model: Any, optim: Any, x: Any) -> float:
    t = time.perf_counter()
    _step(model, optim, x)
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method, round by round (interleaved), each round in a fresh process."""
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    results: dict[str, Any] = {
        "meta": {"size_gb": args.size_gb, "rounds": args.rounds, "saves": args.saves},
        "methods": {n: [] for n in names},
    }
    os.makedirs(args.out, exist_ok=True)
    for r in range(args.rounds):
        for name in names:
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            argv = ["--size-gb", str(args.size_gb), "--rounds", str(args.saves), "--dir", args.dir]
            results["methods"][name].append(run_child("distckpt.bench.overlap", name, args.out, argv, args.timeout))
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    rounds = [r for run in runs if "error" not in run for r in run["rounds"]]
    if not rounds:
        return None
    floors = [run["stall_floor"] for run in runs if "error" not in run]
    out = {k: statistics.median(r[k] for r in rounds) for k in ("stall", "extra", "lost", "durable", "baseline")}
    out["lost_min"], out["lost_max"] = min(r["lost"] for r in rounds), max(r["lost"] for r in rounds)
    out["stall_floor"] = statistics.median(floors)
    firsts = [run["first"] for run in runs if "error" not in run]
    out["first_save"] = statistics.median(f["durable"] for f in firsts)
    out["first_stall"] = statistics.median(f["stall"] for f in firsts)
    out["first_lost"] = statistics.median(f["lost"] for f in firsts)
    return out


def report(results: dict[str, Any], out: str) -> list[str]:
    summ = {n: s for n, runs in results["methods"].items() if (s := summarize(runs))}
    floor = statistics.median(s["stall_floor"] for s in summ.values()) if summ else float("nan")
    lines = [
        f"{results['meta']['size_gb']} GB state, {results['meta']['rounds']} rounds x "
        f"{results['meta'].get('saves', 1)} saves; stall floor (memcpy of the "
        f"state) {floor:.3f}s; step time {statistics.median(s['baseline'] for s in summ.values()):.3f}s",
        f"{'method':30} {'stall s':>8} {'extra s':>8} {'lost s':>8} {'(min-max)':>14} {'durable s':>10} "
        f"{'lost/floor':>10} {'1st stall':>10} {'1st lost':>9}",
    ]
    for name, s in summ.items():
        lines.append(
            f"{name:30} {s['stall']:8.3f} {s['extra']:8.3f} {s['lost']:8.3f} "
            f"{'(' + format(s['lost_min'], '.2f') + '-' + format(s['lost_max'], '.2f') + ')':>14} "
            f"{s['durable']:10.2f} {s['lost'] / floor:10.1f}x {s['first_stall']:10.3f} {s['first_lost']:9.3f}"
        )
    theirs = summ.get("dcp.async_save")
    for name in ("distckpt async", "distckpt async[overlap]"):
        ours = summ.get(name)
        if ours and theirs:
            lines.append(f"{name} loses {theirs['lost'] / ours['lost']:.1f}x less training time than dcp.async_save")
        if ours:
            lines.append(
                f"{name}: first save right after construction: stall {ours['first_stall'] / ours['stall']:.2f}x, "
                f"lost {ours['first_lost'] / ours['lost']:.2f}x the later saves' (medians)"
            )
    results["summary"] = summ
    with open(os.path.join(out, "overlap.json"), "w") as f:
        json.dump(results, f, indent=1)
    _chart(summ, os.path.join(out, "overlap.png"))
    return lines


def _chart(summ: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summ)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    stall = [summ[n]["stall"] for n in names]
    extra = [max(0.0, summ[n]["extra"]) for n in names]
    ax.barh(names, stall, label="stall")
    ax.barh(names, extra, left=stall, label="slower steps while saving")
    ax.set_xlabel("training time lost per save (s, median)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="overlap_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-gb", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3, help="rounds: each method once per round, in a fresh process")
    p.add_argument("--saves", type=int, default=1, help="measured saves per process (after the first two)")
    p.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--out", default="bench_out/overlap")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: <out>/work)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
