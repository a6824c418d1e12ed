"""transformers' Trainer through distckpt: the real package, two CPU processes under torchrun,
SIGKILLed mid-run and resumed with ``trainer.train(resume_from_checkpoint=True)``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import transformers  # noqa: F401 - a missing framework fails the suite, never skips it

from distckpt.integrations.links import read_link
from tests.support import REPO, jobs

JOB = os.path.join(REPO, "tests", "integrations", "transformers_job.py")
FINAL = re.compile(r"final global_step=(\d+) best=(\S*) params_sha256=([0-9a-f]{64})")


def _cmd(out_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", JOB, out_dir, *extra]


def _checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(n.split("-")[1]) for n in os.listdir(out_dir) if re.fullmatch(r"checkpoint-\d+", n))


@pytest.mark.timeout(400)
def test_trainer_killed_and_resumed_with_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    # The reference is the Trainer's own checkpointing: distckpt must not change the training.
    ref = FINAL.search(jobs.run_job(_cmd(str(tmp_path / "ref"), "--trainer", "hf"), tmp_path / "ref.log"))
    assert ref and ref.group(1) == "40"

    out = str(tmp_path / "run")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(out, "--step-sleep", "0.15"), stdout=log, stderr=subprocess.STDOUT,
                                env=jobs.env())  # fmt: skip
    try:
        jobs.wait_for(lambda: any(s >= 15 for s in _checkpoints(out)), 240, "checkpoint-15")
    finally:
        jobs.kill_tree(proc)
    assert proc.returncode == -9
    killed_at = max(_checkpoints(out))
    assert killed_at < 40
    for step in _checkpoints(out):  # a checkpoint-N directory exists only once step N is committed
        link = read_link(os.path.join(out, f"checkpoint-{step}", "distckpt.json"))
        assert link.step == step and os.path.isfile(os.path.join(link.root, f"step_{step:012d}", "manifest.json"))

    text = jobs.run_job(_cmd(out), tmp_path / "resumed.log")
    assert f"resuming from {os.path.join(out, f'checkpoint-{killed_at}')}" in text
    final = FINAL.search(text)
    assert final and final.groups() == ref.groups(), (text[-2000:], ref.group(0))

    # save_total_limit=2 (the best is kept too): directories and distckpt steps go together.
    kept = _checkpoints(out)
    assert len(kept) <= 3 and kept[-1] == 40
    steps = sorted(int(n[5:]) for n in os.listdir(os.path.join(out, ".distckpt")) if n.startswith("step_"))
    assert steps == kept
    state = json.load(open(os.path.join(out, "checkpoint-40", "trainer_state.json")))
    assert state["global_step"] == 40 and os.path.basename(state["best_model_checkpoint"]) == final.group(2)
