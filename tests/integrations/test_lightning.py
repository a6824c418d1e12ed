"""Lightning through distckpt: real ``pytorch-lightning``, DDP on two gloo processes under
torchrun, SIGKILLed mid-run and resumed with Lightning's own ``ckpt_path="last"``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from distckpt.integrations.lightning import DistckptCheckpointIO, load
from distckpt.integrations.links import read_link
from tests.support import REPO, jobs

JOB = os.path.join(REPO, "tests", "integrations", "lightning_job.py")
FINAL = re.compile(r"final epoch=(\d+) global_step=(\d+) params_sha256=([0-9a-f]{64})")
START = re.compile(r"start epoch=(\d+) global_step=(\d+)")
EPOCHS = 8


def _cmd(ckpt_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", JOB, "--dir", ckpt_dir,
            "--epochs", str(EPOCHS), *extra]  # fmt: skip


def _last_epoch(ckpt_dir):
    try:
        link = read_link(os.path.join(ckpt_dir, "last.ckpt"))
    except (FileNotFoundError, json.JSONDecodeError):
        return -1
    return link.meta["lightning"]["epoch"] if link else -1


@pytest.mark.timeout(400)
def test_lightning_ddp_killed_and_resumed_with_ckpt_path_last_matches_an_uninterrupted_run(tmp_path):
    # The reference is Lightning's own checkpointing: distckpt must not change the training.
    ref = FINAL.search(jobs.run_job(_cmd(str(tmp_path / "ref"), "--io", "torch"), tmp_path / "ref.log"))
    assert ref and int(ref.group(1)) == EPOCHS

    ckpt_dir = str(tmp_path / "ckpt")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(ckpt_dir, "--epoch-sleep", "0.4"), stdout=log, stderr=subprocess.STDOUT,
                                env=jobs.env())  # fmt: skip
    try:
        jobs.wait_for(lambda: _last_epoch(ckpt_dir) >= 3, 240, "last.ckpt at epoch 3")
    finally:
        jobs.kill_tree(proc)
    assert proc.returncode == -9
    killed_at = _last_epoch(ckpt_dir)
    assert 3 <= killed_at < EPOCHS - 1

    out = jobs.run_job(_cmd(ckpt_dir, "--resume"), tmp_path / "resumed.log")
    start, final = START.search(out), FINAL.search(out)
    assert start and int(start.group(1)) >= killed_at + 1, out  # it resumed, not restarted
    assert final and final.groups() == ref.groups(), (out, ref.group(0))

    # Every .ckpt is a link to a committed step; top-k removal deleted the others.
    links = {n: read_link(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if n.endswith(".ckpt")}
    assert "last.ckpt" in links and len(links) == 3, links  # top-2 + last
    steps = {int(n[5:]) for n in os.listdir(os.path.join(ckpt_dir, ".distckpt")) if n.startswith("step_")}
    assert {link.step for link in links.values()} <= steps
    assert len(steps) <= len(links) + 2, steps  # a step replaced since the last commit may wait for the next one
    last = load(os.path.join(ckpt_dir, "last.ckpt"))
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == int(ref.group(2))
    assert set(last["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


class _Tiny(pl.LightningModule):
    def __init__(self, extra=None):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(tmp_path, io, model, **ckpt_kwargs):
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), **ckpt_kwargs)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], plugins=[io], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer, cb


@pytest.mark.timeout(120)
def test_top_k_removal_deletes_the_step_and_on_commit_fires_once_per_checkpoint(tmp_path):
    committed = []
    io = DistckptCheckpointIO(on_commit=lambda path, info: committed.append((os.path.basename(path), info.step)))
    trainer, cb = _fit(tmp_path, io, _Tiny(), save_top_k=1, monitor="step", mode="max", every_n_epochs=1)
    names = sorted(n for n in os.listdir(tmp_path / "ck") if n.endswith(".ckpt"))
    assert names == ["epoch=2-step=12.ckpt"]
    assert [n for n, _ in committed] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"]
    steps = sorted(int(n[5:]) for n in os.listdir(tmp_path / "ck" / ".distckpt") if n.startswith("step_"))
    assert steps == [committed[-1][1]]  # teardown deleted the steps whose links top-k removed
    state = load(cb.best_model_path)
    assert state["optimizer_states"][0]["param_groups"][0]["momentum"] == 0.9
    assert isinstance(state["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.Tensor)
    assert state["hyper_parameters"] == {"extra": None}


@pytest.mark.timeout(120)
def test_a_hyperparameter_that_is_not_json_is_refused_with_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"builtins.object at .lightning.hyper_parameters.extra.*never pickle.*ignore="):
        _fit(tmp_path, DistckptCheckpointIO(async_save=False), _Tiny(extra=object()), every_n_epochs=1)


@pytest.mark.timeout(120)
def test_a_lightning_checkpoint_written_before_distckpt_still_resumes(tmp_path):
    trainer, cb = _fit(tmp_path, pl.plugins.TorchCheckpointIO(), _Tiny(), save_last=True)
    model = _Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)
    again = pl.Trainer(max_epochs=4, plugins=[DistckptCheckpointIO()], logger=False, enable_progress_bar=False,
                       enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path))  # fmt: skip
    again.fit(model, data, ckpt_path=cb.last_model_path)
    assert again.global_step == 16


@pytest.mark.timeout(180)
def test_checkpoints_on_s3_resume_with_ckpt_path_last(tmp_path, s3_root, s3_options):
    io = DistckptCheckpointIO(s3_root, storage_options=s3_options)
    _fit(tmp_path, io, _Tiny(), save_last=True)
    link = read_link(str(tmp_path / "ck" / "last.ckpt"))
    assert link.root == s3_root and link.meta["lightning"]["global_step"] == 12

    model = _Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)
    cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    again = pl.Trainer(max_epochs=4, callbacks=[cb], plugins=[DistckptCheckpointIO(s3_root, storage_options=s3_options)],
                       logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                       devices=1)  # fmt: skip
    again.fit(model, data, ckpt_path="last")
    assert again.global_step == 16  # resumed at 12 from S3, trained one more epoch
    assert load(str(tmp_path / "ck" / "last.ckpt"), storage_options=s3_options)["global_step"] == 16
