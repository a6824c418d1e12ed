"""Accelerate through distckpt: the real ``accelerate`` package, two CPU processes started by
``accelerate launch``, SIGKILLed mid-run and resumed with ``accelerator.load_state()``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import accelerate  # noqa: F401 - a missing framework fails the suite, never skips it
import pytest
import torch

from distckpt import NoCheckpointError
from distckpt.integrations.accelerate import LINK_NAME, DistckptAccelerator
from distckpt.integrations.links import read_link
from tests.support import REPO, jobs

JOB = os.path.join(REPO, "tests", "integrations", "accelerate_job.py")
FINAL = re.compile(r"final epoch=(\d+) counter=(\d+) params_sha256=([0-9a-f]{64})")
RESUMED = re.compile(r"resumed at epoch=(\d+)")


def _cmd(project_dir, *extra):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    return [*launch, JOB, project_dir, *extra]


@pytest.mark.timeout(400)
def test_accelerate_killed_and_resumed_with_load_state_matches_an_uninterrupted_run(tmp_path):
    ref = FINAL.search(jobs.run_job(_cmd(str(tmp_path / "ref")), tmp_path / "ref.log"))
    assert ref and ref.group(1) == "6"

    project = str(tmp_path / "run")
    ckpts = os.path.join(project, "checkpoints")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(project, "--epoch-sleep", "0.5"), stdout=log, stderr=subprocess.STDOUT,
                                env=jobs.env())  # fmt: skip
    try:
        jobs.wait_for(lambda: any(s >= 2 for s in jobs.committed(ckpts)), 240, "step 2 to be committed")
    finally:
        jobs.kill_tree(proc)
    assert proc.returncode == -9
    killed_at = max(jobs.committed(ckpts))
    assert killed_at < 5

    out = jobs.run_job(_cmd(project), tmp_path / "resumed.log")
    resumed, final = RESUMED.search(out), FINAL.search(out)
    assert resumed and int(resumed.group(1)) >= killed_at + 1, out
    assert final and final.groups() == ref.groups(), (out, ref.group(0))
    assert jobs.committed(ckpts) == [4, 5]  # total_limit=2


class _Registered:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.mark.timeout(120)
def test_save_state_to_a_directory_links_it_and_saving_there_again_deletes_the_old_step(tmp_path):
    acc = DistckptAccelerator(checkpoint_options={"async_save": True})
    model = torch.nn.Linear(4, 2)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optim = acc.prepare(model, optim)
    obj = _Registered()
    acc.register_for_checkpointing(obj)
    out = tmp_path / "out"
    saved = {}
    for i, name in enumerate(["a", "a", "b"]):
        with torch.no_grad():
            model.weight.fill_(float(i))
        obj.value = i
        acc.save_state(str(out / name))
        saved[name] = i
    acc.wait_for_checkpoints()
    links = {n: read_link(str(out / n / LINK_NAME)) for n in ("a", "b")}
    assert links["a"].step == 2 and links["b"].step == 3

    with torch.no_grad():
        model.weight.zero_()
    acc.load_state(str(out / "a"))
    assert obj.value == 1 and torch.equal(model.weight, torch.full_like(model.weight, 1.0))
    acc.end_training()  # deletes step 1, which no link reaches any more
    assert sorted(os.listdir(out / ".distckpt")) == ["latest.json", "step_000000000002", "step_000000000003"]


@pytest.mark.timeout(120)
def test_load_state_of_a_directory_without_a_committed_link_says_what_it_is(tmp_path):
    acc = DistckptAccelerator()
    acc.prepare(torch.nn.Linear(2, 2))
    (tmp_path / "native").mkdir()
    torch.save({}, tmp_path / "native" / "optimizer.bin")
    with pytest.raises(NoCheckpointError, match="no distckpt checkpoint.*accelerate's own save_state"):
        acc.load_state(str(tmp_path / "native"))
    acc.end_training()
