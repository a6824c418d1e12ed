"""A small, real, deterministic training job that checkpoints with distckpt.

    torchrun --nproc-per-node 2 launch/train.py --ckpt-dir DIR --steps N --save-every K

A DDP-wrapped MLP with dropout learns a fixed random "teacher" on synthetic data, fed by
a shuffling ``ResumableSampler``. It resumes from DIR automatically: model, optimizer,
scheduler, sampler position and every rank's RNGs, so an interrupted-and-resumed run ends
bit-identical to an uninterrupted one. The last line it prints (rank 0) is

    final step=<N> params_sha256=<hex>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import distckpt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="checkpoint root: a directory or fsspec URL (s3://...)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--mode", choices=["sharded", "chief"], default="sharded")
    p.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--storage-options", default="{}", help="JSON passed to fsspec (e.g. an S3 endpoint)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to idle per step (demo pacing)")
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


def params_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)  # per-rank randomness (dropout), carried by RNGState

    data = make_data()
    sampler = distckpt.ResumableSampler(data, shuffle=True, seed=0, drop_last=True)
    # A DataLoader draws a seed for every new iterator from the global RNG unless given its
    # own generator; a resumed run creates its iterator at another point of the RNG stream.
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())
    model = DDP(make_model(args.hidden))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(args.steps, 1))

    ckpt = distckpt.Checkpointer(
        args.ckpt_dir,
        {"model": model, "optim": optim, "sched": sched, "sampler": sampler, "rng": distckpt.RNGState()},
        mode=args.mode,
        async_save=args.async_save,
        keep=distckpt.Keep(last=args.keep_last),
        storage_options=json.loads(args.storage_options),
    )
    info = ckpt.restore()
    step = info.step if info else 0
    if rank == 0:
        print(f"resumed from step {step}" if info else "starting fresh", flush=True)

    loss_fn = nn.CrossEntropyLoss()
    epoch = sampler.epoch
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if step % args.save_every == 0 or step == args.steps:
                ckpt.save(step, meta={"loss": loss.item(), "epoch": epoch})
                if rank == 0:
                    print(f"step {step} loss {loss.item():.4f} saved", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    ckpt.close()
    if rank == 0:
        print(f"final step={step} params_sha256={params_sha256(model.module)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
