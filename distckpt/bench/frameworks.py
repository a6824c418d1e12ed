"""Each framework's own checkpointing against the same framework through distckpt.

    python -m benchmarks.frameworks_bench --size-mb 256 --rounds 2

One state per framework (a model of ``--size-mb`` MB of fp32 weights plus AdamW's two
moments: ~3x that per checkpoint), saved the way that framework's users save it:

* Lightning: ``trainer.save_checkpoint(path)`` with the default ``TorchCheckpointIO``,
  with Lightning's ``AsyncCheckpointIO``, and with ``DistckptCheckpointIO``;
* Accelerate: ``accelerator.save_state(dir)`` with ``Accelerator`` and ``DistckptAccelerator``;
* transformers: the Trainer's own checkpoint step (``_save_checkpoint``, what ``save_steps``
  runs) with ``Trainer`` and ``DistckptTrainer``.

Per method: the *stall* (how long the call blocks training) and the time until the
checkpoint is *durable*. The frameworks' own writers never fsync, so their durable time is
the stall plus an fsync of every file they wrote (plus, for an async writer, the wait for it);
distckpt's is until its commit (files and directory fsynced). Each method runs in a fresh
process (a warm-up save, then ``--saves`` measured ones; medians), the methods interleaved
with the order rotating each round. Writes ``<out>/frameworks.json`` and
``<out>/frameworks.png``.
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
from .methods import _fsync_tree

METHODS = {
    "lightning": ("TorchCheckpointIO", "AsyncCheckpointIO", "distckpt"),
    "accelerate": ("Accelerator", "distckpt"),
    "transformers": ("Trainer", "distckpt"),
}


def _net(size_bytes: int) -> Any:
    import torch

    width = 1024
    layers = max(1, size_bytes // (width * width * 4))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def _timed(save: Callable[[], Any], durable: Callable[[], Any]) -> tuple[float, float]:
    t0 = time.perf_counter()
    save()
    stall = time.perf_counter() - t0
    durable()
    return stall, time.perf_counter() - t0


def _lightning(method: str, work: str, size: int, saves: int) -> list[tuple[float, float]]:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from ..integrations.lightning import DistckptCheckpointIO

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(size)

        def training_step(self, batch: Any, idx: int) -> Any:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    io = {"TorchCheckpointIO": TorchCheckpointIO, "AsyncCheckpointIO": AsyncCheckpointIO}.get(
        method, DistckptCheckpointIO
    )()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, plugins=[io])  # fmt: skip
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1024)), batch_size=4)
    trainer.fit(Module(), data)
    out = []
    for i in range(saves + 1):
        path = os.path.join(work, f"step-{i}.ckpt")
        if method == "TorchCheckpointIO":
            out.append(_timed(lambda p=path: trainer.save_checkpoint(p), lambda p=path: _fsync_tree(p)))
        elif method == "AsyncCheckpointIO":
            out.append(
                _timed(lambda p=path: trainer.save_checkpoint(p), lambda p=path: (io.teardown(), _fsync_tree(p)))
            )
        else:
            out.append(_timed(lambda p=path: trainer.save_checkpoint(p), io.wait))
    io.teardown()
    return out


def _accelerate(method: str, work: str, size: int, saves: int) -> list[tuple[float, float]]:
    import torch
    from accelerate import Accelerator

    from ..integrations.accelerate import DistckptAccelerator

    acc = DistckptAccelerator(cpu=True) if method == "distckpt" else Accelerator(cpu=True)
    model = _net(size)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optim = acc.prepare(model, optim)
    acc.backward(model(torch.randn(4, 1024)).pow(2).mean())
    optim.step()
    out = []
    for i in range(saves + 1):
        d = os.path.join(work, f"step-{i}")
        wait = acc.wait_for_checkpoints if method == "distckpt" else (lambda d=d: _fsync_tree(d))
        out.append(_timed(lambda d=d: acc.save_state(d), wait))
    acc.end_training()
    return out


def _transformers(method: str, work: str, size: int, saves: int) -> list[tuple[float, float]]:
    import torch
    from transformers import Trainer, TrainingArguments

    from ..integrations.transformers import DistckptTrainer

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(size)

        def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
            return {"loss": self.net(x).pow(2).mean()}

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"x": torch.randn(1024), "labels": torch.zeros(1)}

    args = TrainingArguments(output_dir=work, max_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, disable_tqdm=True)  # fmt: skip
    trainer = (DistckptTrainer if method == "distckpt" else Trainer)(model=Model(), args=args, train_dataset=Rows())
    trainer.train()
    out = []
    for i in range(saves + 1):
        trainer.state.global_step = 100 + i
        d = os.path.join(work, f"checkpoint-{100 + i}")
        wait = trainer.wait_for_checkpoints if method == "distckpt" else (lambda d=d: _fsync_tree(d))
        out.append(_timed(lambda: trainer._save_checkpoint(trainer.model, None), wait))
    if method == "distckpt":
        trainer._close()
    return out


RUNNERS = {"lightning": _lightning, "accelerate": _accelerate, "transformers": _transformers}


def child(args: argparse.Namespace) -> None:
    framework, method = args.child.split(":")
    work = os.path.join(args.dir, args.child.replace(":", "_"))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        times = RUNNERS[framework](method, work, args.size_mb << 20, args.saves)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = times[1:]  # the first save is a warm-up (allocations, imports, plans)
    result = {
        "first": {"stall_s": times[0][0], "durable_s": times[0][1]},
        "stall_s": statistics.median(t[0] for t in measured),
        "durable_s": statistics.median(t[1] for t in measured),
    }
    json.dump(result, open(args.json, "w"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [f"{fw}:{m}" for fw, ms in METHODS.items() if fw in args.frameworks for m in ms]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        print(f"round {r + 1}/{args.rounds}", flush=True)
        argv = ["--dir", args.dir, "--size-mb", str(args.size_mb), "--saves", str(args.saves)]
        rounds.append({n: run_child("distckpt.bench.frameworks", n, args.out, argv, args.timeout) for n in order})
    return {"meta": {"size_mb": args.size_mb, "rounds": args.rounds, "saves": args.saves}, "rounds": rounds,
            "summary": summarize(rounds, names)}  # fmt: skip


def summarize(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per method: medians over rounds, the range, and ratios to its framework's default."""
    out: dict[str, Any] = {}
    for name in names:
        ok = [r[name] for r in rounds if "error" not in r.get(name, {"error": 1})]
        if not ok:
            out[name] = {"error": [r.get(name, {}).get("error") for r in rounds]}
            continue
        out[name] = {k: statistics.median(x[k] for x in ok) for k in ("stall_s", "durable_s")}
        out[name]["stall_range"] = [min(x["stall_s"] for x in ok), max(x["stall_s"] for x in ok)]
        out[name]["durable_range"] = [min(x["durable_s"] for x in ok), max(x["durable_s"] for x in ok)]
    for name in names:
        default = out.get(f"{name.split(':')[0]}:{METHODS[name.split(':')[0]][0]}", {})
        if "error" not in out[name] and "stall_s" in default:
            out[name]["stall_vs_default"] = out[name]["stall_s"] / default["stall_s"]
            out[name]["durable_vs_default"] = out[name]["durable_s"] / default["durable_s"]
    return out


def report(results: dict[str, Any], out: str) -> list[str]:
    meta, summ = results["meta"], results["summary"]
    lines = [f"{meta['size_mb']} MB of weights + AdamW (~{3 * meta['size_mb']} MB per checkpoint), "
             f"{meta['rounds']} rounds x {meta['saves']} saves; medians [range]; ratios to the framework's default",
             f"{'framework: method':34} {'stall s':>22} {'durable s':>22} {'stall x':>8} {'durable x':>9}"]  # fmt: skip
    for name, s in summ.items():
        if "error" in s:
            lines.append(f"{name:34} failed: {s['error']}")
            continue
        stall = f"{s['stall_s']:.3f} [{s['stall_range'][0]:.3f}-{s['stall_range'][1]:.3f}]"
        durable = f"{s['durable_s']:.3f} [{s['durable_range'][0]:.3f}-{s['durable_range'][1]:.3f}]"
        ratios = f"{s.get('stall_vs_default', float('nan')):8.3f} {s.get('durable_vs_default', float('nan')):9.2f}"
        lines.append(f"{name:34} {stall:>22} {durable:>22} {ratios}")
    json.dump(results, open(os.path.join(out, "frameworks.json"), "w"), indent=1)
    _chart(summ, os.path.join(out, "frameworks.png"))
    return lines


def _chart(summ: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in summ.items() if "error" not in s]
    fig, ax = plt.subplots(figsize=(9, 4))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [summ[n]["durable_s"] for n in names], 0.4, label="until durable")
    ax.barh([i - 0.2 for i in y], [summ[n]["stall_s"] for n in names], 0.4, label="stall (training blocked)")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per checkpoint (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=256, help="model weights (fp32); a checkpoint is ~3x with AdamW")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--saves", type=int, default=3, help="measured saves per method and round (after a warm-up)")
    p.add_argument("--frameworks", default="lightning,accelerate,transformers")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: <out>/work)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.frameworks = args.frameworks.split(",")
    args.dir = args.dir or os.path.join(args.out, "work")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    os.makedirs(args.out, exist_ok=True)
    for line in report(run(args), args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
