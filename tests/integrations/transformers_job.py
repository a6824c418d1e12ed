"""A transformers ``Trainer`` job on CPU processes that checkpoints through distckpt.

    torchrun --nproc-per-node 2 tests/integrations/transformers_job.py DIR [--trainer distckpt|hf]
        [--max-steps 40] [--step-sleep 0.05]

Saves every 5 steps (``save_total_limit=2``), evaluates every 5 (best model by eval loss,
``load_best_model_at_end``); resumes with the Trainer's own
``train(resume_from_checkpoint=True)`` when ``DIR`` holds a checkpoint. Prints
``final global_step=<n> params_sha256=<hex>`` on the main process.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from distckpt.integrations.transformers import DistckptTrainer


class Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
        self.y = self.x[:, :1] ** 2 - self.x[:, 1:2]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class Pace(TrainerCallback):
    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        time.sleep(self.sleep)


def main() -> None:
    train()
    # torch's gloo teardown can deadlock (pytorch/pytorch#56297, seen here in CI): the DDP
    # wrapper, freed last, frees the group holding the GIL while a gloo thread waits for the
    # GIL to free a finished collective's tensors. The trainer and its DDP model are gone once
    # train() returns; destroy_process_group then frees the group with the GIL released.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--trainer", choices=["distckpt", "hf"], default="distckpt")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    targs = TrainingArguments(
        output_dir=args.dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=5,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=5,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        seed=0,
        report_to=[],
        use_cpu=True,
        logging_steps=5,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    set_seed(0)  # before the model is made: its initial weights
    cls = DistckptTrainer if args.trainer == "distckpt" else Trainer
    trainer = cls(model=Regressor(), args=targs, train_dataset=Rows(96, 1), eval_dataset=Rows(32, 2),
                  callbacks=[Pace(args.step_sleep)])  # fmt: skip
    resume = os.path.isdir(args.dir) and get_last_checkpoint(args.dir) is not None
    if resume and trainer.is_world_process_zero():
        print(f"resuming from {get_last_checkpoint(args.dir)}", flush=True)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if trainer.is_world_process_zero():
        digest = hashlib.sha256()
        for name, t in sorted(trainer.model.state_dict().items()):
            digest.update(name.encode() + t.detach().numpy().tobytes())
        best = os.path.basename(trainer.state.best_model_checkpoint or "")
        print(f"final global_step={trainer.state.global_step} best={best} params_sha256={digest.hexdigest()}")


if __name__ == "__main__":
    main()
