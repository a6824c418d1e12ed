"""An Accelerate training loop on CPU processes that checkpoints through distckpt.

    accelerate launch --multi_gpu --num_processes 2 tests/integrations/accelerate_job.py DIR
        [--epochs 6] [--epoch-sleep 0.3]

``save_state()`` after every epoch (automatic checkpoint naming, ``total_limit=2``); a
restart finds ``DIR/checkpoints`` and calls ``load_state()``. Dropout, a shuffled loader, a
scheduler and a registered object make every piece of state matter. Prints
``final epoch=<e> counter=<n> params_sha256=<hex>`` on the main process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch
from accelerate.utils import ProjectConfiguration, set_seed

from distckpt.integrations.accelerate import DistckptAccelerator


class Counter:
    """A user object registered for checkpointing."""

    def __init__(self) -> None:
        self.batches = 0

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--epoch-sleep", type=float, default=0.0)
    args = p.parse_args()
    config = ProjectConfiguration(project_dir=args.dir, automatic_checkpoint_naming=True, total_limit=2)
    acc = DistckptAccelerator(project_config=config)
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, 5, 0.5)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] ** 2), batch_size=16, shuffle=True)
    model, optim, sched, loader = acc.prepare(model, optim, sched, loader)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    start = 0
    if os.path.isdir(os.path.join(args.dir, "checkpoints")):
        acc.load_state()
        start = acc.save_iteration
        acc.print(f"resumed at epoch={start}")
    for _ in range(start, args.epochs):
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            acc.backward(loss)
            optim.step()
            sched.step()
            optim.zero_grad()
            counter.batches += 1
        acc.save_state()
        time.sleep(args.epoch_sleep)
    acc.wait_for_checkpoints()
    digest = hashlib.sha256()
    for name, t in sorted(acc.unwrap_model(model).state_dict().items()):
        digest.update(name.encode() + t.numpy().tobytes())
    acc.print(f"final epoch={acc.save_iteration} counter={counter.batches} params_sha256={digest.hexdigest()}")
    acc.end_training()


if __name__ == "__main__":
    main()
