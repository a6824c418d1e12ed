"""Preemption on a real SLURM cluster: slurmctld + slurmd + munged on 127.0.0.1, brought up
by the project's launch/slurm/cluster_up.sh. 2-rank jobs from launch/slurm/train.sbatch
(one srun task per rank) are preempted by ``scancel --signal=USR1`` and by the time limit's
``--signal=B:USR1@<lead>``, save, requeue themselves and end bit-exact with an
uninterrupted run. No mocks: sbatch, scancel, scontrol and srun are the real ones."""

import contextlib
import fcntl
import os
import re
import subprocess
import time

import psutil
import pytest

from tests.support import jobs

SLURM_DIR = os.path.join(jobs.REPO, "launch", "slurm")
USERS = "/tmp/distckpt-slurm-users"  # one file per test process (pytest-xdist worker) using it
OWNED = os.path.join(USERS, "started-by-tests")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@contextlib.contextmanager
def _users_locked():
    os.makedirs(USERS, exist_ok=True)
    with open(os.path.join(USERS, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _live_users() -> list[int]:
    pids = [int(n) for n in os.listdir(USERS) if n.isdigit()]
    return [p for p in pids if psutil.pid_exists(p)]


def _slurmctld_running() -> bool:
    try:
        with open("/run/slurm/slurmctld.pid") as f:
            return psutil.pid_exists(int(f.read().strip()))
    except (OSError, ValueError):
        return False


def _script(name: str, timeout: float) -> str:
    proc = subprocess.run(["bash", os.path.join(SLURM_DIR, name)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM cluster for the session, shared by the xdist workers.

    The first user starts it with launch/slurm/cluster_up.sh (which installs slurm-wlm and
    munge with apt-get when they are missing); the last one to finish stops it with
    cluster_down.sh. A cluster that was already running before the tests is left running.
    """
    me = os.path.join(USERS, str(os.getpid()))
    with _users_locked():
        for pid in {int(n) for n in os.listdir(USERS) if n.isdigit()} - set(_live_users()):
            os.remove(os.path.join(USERS, str(pid)))  # left by a test process that died
        if not _slurmctld_running():
            _script("cluster_up.sh", 600)
            open(OWNED, "w").close()
        open(me, "w").close()
    yield
    with _users_locked():
        os.remove(me)
        if not _live_users() and os.path.exists(OWNED):
            _script("cluster_down.sh", 300)
            os.remove(OWNED)


@pytest.fixture
def reference(tmp_path_factory):
    return jobs.reference(tmp_path_factory)


def sbatch(out, ckpt_dir, *options: str, train_args: tuple[str, ...] = ()) -> str:
    cmd = ["sbatch", "--parsable", "--output", str(out), *options, jobs.SBATCH]
    cmd += ["--ckpt-dir", ckpt_dir, *jobs.TRAIN_ARGS, *train_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=jobs.env(), cwd=jobs.REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(job: str) -> dict[str, str]:
    """JobState, Restarts, ExitCode from ``scontrol show job`` (no accounting needed)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"\b(JobState|Restarts|ExitCode)=(\S+)", proc.stdout))


def scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], check=True, capture_output=True, timeout=30)


def wait_finished(job: str, timeout: float) -> dict[str, str]:
    return jobs.wait_for(lambda: (s := job_state(job)).get("JobState") in FINISHED and s, timeout, f"job {job}", 0.5)


def check_run(text: str, reference: dict, restarts: int) -> list[float]:
    """Every run of the job shows its SLURM_RESTART_COUNT; each preemption stopped both ranks
    at one step that the next run resumed from; the end equals the uninterrupted run."""
    assert re.findall(r"SLURM_RESTART_COUNT=(\d+)", text) == [str(i) for i in range(restarts + 1)], text[-4000:]
    stops = jobs.STOP.findall(text)
    steps = [int(step) for rank, step in stops if rank == "0"]
    assert sorted(int(step) for rank, step in stops if rank == "1") == sorted(steps) and len(steps) == restarts
    assert [int(s) for s in jobs.RESUMED.findall(text)] == steps
    assert text.count("preemption: requeued SLURM job") == restarts
    assert jobs.result(text) == reference
    return [float(s) for s in jobs.SIGNAL_TO_COMMIT.findall(text)]


@pytest.mark.timeout(600)
def test_slurm_job_preempted_by_scancel_usr1_requeues_itself_and_ends_bit_exact(slurm_cluster, tmp_path, reference):
    ckpt_dir, out = str(tmp_path / "ckpt"), tmp_path / "job.out"
    job = sbatch(out, ckpt_dir, "--time=5", train_args=("--step-sleep", "0.25"))
    try:
        jobs.wait_for(lambda: 10 in jobs.committed(ckpt_dir), 240, "step 10 to be committed")
        scancel("--signal=USR1", "--batch", job)  # to the batch shell only: it forwards to the ranks
        jobs.wait_for(lambda: jobs.RESUMED.findall(out.read_text()), 240, "the requeued run to resume")
        assert job_state(job)["Restarts"] == "1"
        first = max(jobs.committed(ckpt_dir))
        jobs.wait_for(lambda: max(jobs.committed(ckpt_dir)) > first, 240, "a save after the restart")
        scancel("--full", "--signal=USR1", job)  # batch shell and ranks: each rank hears it twice
        state = wait_finished(job, 300)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    text = out.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", (state, text[-4000:])
    assert text.count("SIGUSR1: forwarding it to the ranks") == 2
    seconds = check_run(text, reference, restarts=2)
    print(f"signal -> committed final save (s): {seconds}")


@pytest.mark.timeout(600)
def test_slurm_time_limit_signal_preempts_requeues_and_ends_bit_exact(slurm_cluster, tmp_path, reference):
    """``--time=1 --signal=B:USR1@20``: slurmctld warns the batch shell at its first check
    (about every 30 s) once at most 20 + 30 s remain, i.e. 10-40 s in; 60 steps x 0.7 s
    outlast that. Once requeued, the job gets a longer limit, so its next run is not warned."""
    ckpt_dir, out = str(tmp_path / "ckpt"), tmp_path / "job.out"
    started = time.monotonic()
    job = sbatch(out, ckpt_dir, "--time=1", "--signal=B:USR1@20", train_args=("--step-sleep", "0.7"))
    try:
        jobs.wait_for(lambda: job_state(job).get("Restarts") == "1", 240, "the job to requeue itself", 0.2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, timeout=30)
        state = wait_finished(job, 300)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    text = out.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, text[-4000:])
    assert text.count("SIGUSR1: forwarding it to the ranks") == 1  # SLURM's warning, nothing else
    seconds = check_run(text, reference, restarts=1)
    print(f"done in {time.monotonic() - started:.0f}s; signal -> committed final save (s): {seconds}")
