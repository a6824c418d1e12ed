"""A small, real, deterministic training job that checkpoints with distckpt.

    torchrun --nproc-per-node 2 launch/train.py --ckpt-dir DIR --steps N --save-every K
    sbatch launch/slurm/train.sbatch --ckpt-dir DIR --steps N --save-every K

A DDP-wrapped MLP with dropout learns a fixed random "teacher" on synthetic data, fed by
a shuffling ``ResumableSampler``. It resumes from DIR automatically: model, optimizer,
scheduler, AMP grad scaler (``--amp``), sampler position and every rank's RNGs, so an
interrupted-and-resumed run ends bit-identical to an uninterrupted one.

Preemption (on by default): SIGTERM or SIGUSR1 on any rank makes every rank stop at the
same step, save it, and exit for a restart (SLURM: the job requeues itself; torchrun:
exit code 75, restarted while ``--max-restarts`` allows). The last lines it prints (rank 0) are

    state sha256=<hex> (...)  optimizer, scheduler, scaler, sampler and every rank's RNGs
    final step=<N> params_sha256=<hex>
"""

from __future__ import annotations

import signal

# A job can be signalled while it is still importing torch (seconds, on a busy node). The
# default action would kill it; remember such signals instead and hand them to distckpt
# once its handlers are installed (main(), below).
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import argparse  # noqa: E402 - after the early handlers on purpose
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import distckpt  # noqa: E402


def say(line: str) -> None:
    """One line in one write: under torchrun both ranks and the launcher share the log, and a
    line written in pieces can be split by another process's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="checkpoint root: a directory or fsspec URL (s3://...)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--mode", choices=["sharded", "chief"], default="sharded")
    p.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    p.add_argument(
        "--snapshot",
        choices=["now", "overlap"],
        default="now",
        help="with --async-save, overlap: parameters and optimizer state are copied beside the next step",
    )
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--storage-options", default="{}", help="JSON passed to fsspec (e.g. an S3 endpoint)")
    p.add_argument("--local-dir", default=None, help="node memory or local disk in front of --ckpt-dir (/dev/shm/run)")
    p.add_argument("--upload-every", type=int, default=1, help="with --local-dir: every k-th save goes to --ckpt-dir")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to idle per step (demo pacing)")
    p.add_argument("--amp", action="store_true", help="float16 autocast with a dynamic GradScaler")
    p.add_argument(
        "--preemption",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIGTERM/SIGUSR1: agreed stop, final save, requeue (SLURM) or restart (torchrun)",
    )
    p.add_argument("--check-every", type=int, default=1, help="steps between preemption votes")
    return p.parse_args(argv)


def make_data(n: int = 4096, features: int = 32, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model(hidden: int, features: int = 32, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, classes),
    )


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random scale (Python's RNG) and noise (NumPy's): a resume must restore both."""
    noise = torch.from_numpy(np.random.normal(0.0, 0.01, size=tuple(x.shape))).to(x.dtype)
    return x * random.uniform(0.95, 1.05) + noise


def params_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest(obj: Any, h: Any) -> None:
    """Feed a nested state (dicts, sequences, tensors, arrays, scalars) into a hash."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _digest(item, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode() + obj.tobytes())
    else:
        h.update(repr(obj).encode())


def state_sha256(optim: Any, sched: Any, scaler: Any, sampler: Any) -> tuple[str, str]:
    """(all ranks) a digest of everything but the parameters that a bit-exact resume must
    carry, and one of each part (to tell which one differs)."""
    rngs = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    every_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, rngs)
    parts = {
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        **{f"rng{r}": d for r, d in enumerate(every_rank)},  # python, numpy, torch
    }
    whole, short = hashlib.sha256(), []
    for name, part in parts.items():
        h = hashlib.sha256()
        _digest(part, h)
        whole.update(h.digest())
        short.append(f"{name}={h.hexdigest()[:8]}")
    return whole.hexdigest(), " ".join(short)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preemption = None
    if args.preemption:  # as early as possible: a signal from now on stops the job cleanly
        preemption = distckpt.Preemption(check_every=args.check_every).install()
        for signum in _EARLY_SIGNALS:
            preemption.request(signum)
    else:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        if _EARLY_SIGNALS:
            raise SystemExit(128 + _EARLY_SIGNALS[0])
    dist.init_process_group("gloo")
    train(args, preemption)
    dist.barrier()
    # The DDP model is gone once train() returns, so the process group is freed here, by
    # destroy_process_group with the GIL released. Freed last by the DDP wrapper (which
    # holds the GIL), it can deadlock with a gloo thread that waits for the GIL
    # (pytorch/pytorch#56297; seen with transformers' Trainer).
    gc.collect()
    dist.destroy_process_group()


def train(args: argparse.Namespace, preemption: distckpt.Preemption | None) -> None:
    rank = dist.get_rank()
    data = make_data()
    sampler = distckpt.ResumableSampler(data, shuffle=True, seed=0, drop_last=True)
    # A DataLoader draws a seed for every new iterator from the global RNG unless given its
    # own generator; a resumed run creates its iterator at another point of the RNG stream.
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())
    model = DDP(make_model(args.hidden))  # make_model seeds: identical initial weights
    for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
        seed_fn(1000 + rank)  # per-rank randomness (dropout, augmentation), carried by RNGState
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(args.steps, 1))
    # A short growth interval makes the scale move (and float16 overflow skip steps) within
    # a few dozen steps, so a resume that lost the scaler's state would show.
    scaler = torch.amp.GradScaler("cpu", enabled=args.amp, growth_interval=5)

    ckpt = distckpt.Checkpointer(
        args.ckpt_dir,
        {
            "model": model,
            "optim": optim,
            "sched": sched,
            "scaler": scaler,
            "sampler": sampler,
            "rng": distckpt.RNGState(),
        },
        mode=args.mode,
        async_save=args.async_save,
        snapshot=args.snapshot,
        keep=distckpt.Keep(last=args.keep_last),
        storage_options=json.loads(args.storage_options),
        local_dir=args.local_dir,
        upload_every=args.upload_every,
        preemption=preemption,
    )
    info = ckpt.restore()
    step = info.step if info else 0
    if rank == 0:
        say(f"resumed from step {step} ({info.tier} tier)" if info else "starting fresh")
    if ckpt.should_stop(step):  # signalled while starting up
        ckpt.save_and_exit(step)

    loss_fn = nn.CrossEntropyLoss()
    epoch = sampler.epoch
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x = augment(x)
            with torch.autocast("cpu", dtype=torch.float16, enabled=args.amp):
                loss = loss_fn(model(x), y)
            optim.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optim)
            scaler.update()
            sched.step()
            step += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if step % args.save_every == 0 or step == args.steps:
                ckpt.save(step, meta={"loss": loss.item(), "epoch": epoch})
                if rank == 0:
                    say(f"step {step} loss {loss.item():.4f} saved")
            if step >= args.steps:
                break
            # after the step and its periodic save: the loader has not yet drawn the next
            # batch, so the sampler's position is exactly "after this step"
            if ckpt.should_stop(step):
                ckpt.save_and_exit(step, meta={"loss": loss.item(), "epoch": epoch, "preempted": True})
        epoch += 1
    ckpt.close()
    digest, parts = state_sha256(optim, sched, scaler, sampler)
    if rank == 0:
        say(f"state sha256={digest} ({parts})")
        say(f"final step={step} params_sha256={params_sha256(model.module)}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
