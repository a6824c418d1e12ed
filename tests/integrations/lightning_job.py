"""A Lightning DDP job on CPU that checkpoints through distckpt (or Lightning's own IO).

    torchrun --nproc-per-node 2 tests/integrations/lightning_job.py --dir D [--io distckpt|torch]
        [--epochs 8] [--resume] [--epoch-sleep 0.2]

Saves at every epoch end through ``ModelCheckpoint`` (top-2 by train loss plus ``last.ckpt``),
resumes with Lightning's own ``trainer.fit(model, ckpt_path="last")`` and prints
``final epoch=<e> global_step=<s> params_sha256=<hex>`` on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(pl.LightningModule):
    def __init__(self, width: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict:
        optim = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)
        return {"optimizer": optim, "lr_scheduler": sched}


class Pace(Callback):
    """Slows epochs down so that a test can kill the job between two of them."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"start epoch={trainer.current_epoch} global_step={trainer.global_step}", flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        time.sleep(self.sleep)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    return TensorDataset(x, x[:, :1] * 0.5 - x[:, 1:2] ** 2)


def main() -> None:
    fit()
    # Lightning leaves the gloo group up. Torn down at the interpreter's exit, its threads can
    # abort a rank ("terminate called without an active exception", seen once in CI); freed
    # last by the DDP wrapper, which holds the GIL, it can deadlock (pytorch/pytorch#56297).
    # The trainer and its DDP model are gone once fit() returns: the group is freed here.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--io", choices=["distckpt", "torch"], default="distckpt")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--epoch-sleep", type=float, default=0.0)
    args = p.parse_args()
    pl.seed_everything(0, workers=True, verbose=False)
    plugins = []
    if args.io == "distckpt":
        from distckpt.integrations.lightning import DistckptCheckpointIO

        plugins.append(DistckptCheckpointIO())
    every_epoch = ModelCheckpoint(
        dirpath=args.dir, monitor="train_loss", save_top_k=2, save_last=True, every_n_epochs=1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy="ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto",
        max_epochs=args.epochs,
        callbacks=[every_epoch, Pace(args.epoch_sleep)],
        plugins=plugins,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Net()
    loader = DataLoader(data(), batch_size=16, shuffle=True)
    trainer.fit(model, loader, ckpt_path="last" if args.resume else None)
    if trainer.is_global_zero:
        digest = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            digest.update(name.encode() + t.detach().cpu().numpy().tobytes())
        print(
            f"final epoch={trainer.current_epoch} global_step={trainer.global_step} params_sha256={digest.hexdigest()}"
        )


if __name__ == "__main__":
    main()
