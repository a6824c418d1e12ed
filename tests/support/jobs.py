"""Run launch/train.py as real jobs (torchrun, SLURM) and read what they leave behind.

Shared by the torchrun and SLURM tests: the training arguments every preemption test uses,
the uninterrupted reference run they are compared with (computed once per test session,
also across pytest-xdist workers), and small polling helpers (deadlines, never fixed sleeps).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
from filelock import FileLock

from tests.support import REPO

TRAIN = os.path.join(REPO, "launch", "train.py")
TORCHRUN_SH = os.path.join(REPO, "launch", "torchrun.sh")
SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")

# 60 steps of a 2-rank DDP job with float16 autocast and a dynamic GradScaler, saving every 10
# steps: a preemption lands between periodic saves, so the final save is a step of its own.
STEPS = 60
TRAIN_ARGS = ["--steps", str(STEPS), "--save-every", "10", "--amp", "--hidden", "64"]

FINAL = re.compile(r"final step=(\d+) params_sha256=([0-9a-f]{64})")
STATE = re.compile(r"state sha256=([0-9a-f]{64})")
STOP = re.compile(r"\[rank (\d+)\] preemption: .* all ranks stop at step (\d+)")
RESUMED = re.compile(r"resumed from step (\d+)")
SIGNAL_TO_COMMIT = re.compile(r"\[rank 0\] preemption: .*; ([0-9.]+)s from the signal to the committed final save")


def env(**extra: str) -> dict[str, str]:
    """The environment for a job: this interpreter, no leaked rank or SLURM variables (a
    test run inside a SLURM job must not make its jobs requeue that job)."""
    leaked = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    out = {k: v for k, v in os.environ.items() if k not in leaked and not k.startswith("SLURM_")}
    out.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return out


def result(text: str) -> dict[str, Any]:
    """The final step, parameter digest and state digest a finished train.py printed."""
    final, state = FINAL.findall(text), STATE.findall(text)
    assert final and state, f"the job did not finish:\n{text[-4000:]}"
    return {"step": int(final[-1][0]), "params": final[-1][1], "state": state[-1]}


def committed(ckpt_dir: str) -> list[int]:
    """Committed steps on disk (a step counts once its manifest exists)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d{12}", n)]
    return sorted(int(n[5:]) for n in names if os.path.exists(os.path.join(ckpt_dir, n, "manifest.json")))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run_job(cmd: list[str], log_path: Any, timeout: float = 300) -> str:
    """Run a job to its end (stderr to ``log_path``); its stdout. Fails with both on an error."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout + open(log_path).read()[-4000:]
    return proc.stdout


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it at once (torchrun and its workers)."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)


def torchrun_cmd(ckpt_dir: str, *extra: str, launcher: list[str] | None = None) -> list[str]:
    """launch/torchrun.sh running train.py with the shared arguments."""
    return ["bash", TORCHRUN_SH, *(launcher or []), "--", "--ckpt-dir", ckpt_dir, *TRAIN_ARGS, *extra]


def reference(tmp_path_factory: Any) -> dict[str, Any]:
    """The uninterrupted run's result, computed once per session (shared by xdist workers)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "train-reference.json"
    with FileLock(str(path) + ".lock", timeout=600):
        if path.exists():
            return json.loads(path.read_text())
        ckpt_dir = str(shared / "train-reference-ckpt")
        cmd = torchrun_cmd(ckpt_dir, launcher=["--max-restarts", "0"])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
        out = result(proc.stdout)
        assert out["step"] == STEPS
        path.write_text(json.dumps(out))
        return out
