"""Preemption: signals become an agreed stop, a final save that nothing interrupts, and a
restart that resumes bit-exact. Real gloo ranks (tests/harness.py) and real torchrun jobs
(launch/torchrun.sh running launch/train.py); the SLURM side is in test_slurm.py."""

import os
import re
import signal
import subprocess
import threading
import time
import uuid

import psutil
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import distckpt
from distckpt import Checkpointer, Preemption
from tests.support import free_port, jobs
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train

# --- configuration and handlers ---------------------------------------------------------


def test_preemption_config_is_validated():
    assert Preemption().signals == (signal.SIGTERM, signal.SIGUSR1)
    assert Preemption(signals=[signal.SIGUSR2, signal.SIGUSR2]).signals == (signal.SIGUSR2,)
    for bad in (
        {"signals": ()},
        {"signals": (signal.SIGKILL,)},
        {"signals": (12345,)},
        {"check_every": 0},
        {"check_every": 1.5},
        {"exit_code": 0},
        {"exit_code": 256},
    ):
        with pytest.raises(ValueError):
            Preemption(**bad)
    with pytest.raises(TypeError):
        Preemption(signal.SIGTERM)  # keyword-only
    with pytest.raises(TypeError):
        distckpt.preemption.as_preemption("yes")


def _single_process(rank, world, root):
    os.environ.pop("SLURM_JOB_ID", None)  # never requeue a job that runs the tests
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    plain = Checkpointer(root + "-plain", {"v": 1})
    assert plain.should_stop(1) is False and plain.preemption is None  # no option, no stop
    plain.close()
    pre = Preemption(check_every=3)
    t = torch.arange(4.0)
    ckpt = Checkpointer(root, {"t": t}, preemption=pre)
    os.kill(os.getpid(), signal.SIGUSR1)  # only counted: the process lives on
    os.kill(os.getpid(), signal.SIGTERM)
    votes = [ckpt.should_stop(s) for s in (1, 2, 3, 4)]  # votes every 3rd step, then stays True
    ckpt.save(3)
    try:
        ckpt.save_and_exit(3)  # step 3 is committed already: no second save
    except SystemExit as e:
        code = e.code
    installed = signal.getsignal(signal.SIGTERM) == pre._on_signal
    pre.uninstall()
    restored = signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    signal.signal(signal.SIGUSR1, previous)
    return votes, pre.count, pre.stop_step, code, installed, restored, sorted(os.listdir(root))


def test_handlers_only_count_signals_and_previous_handlers_come_back(root):
    votes, count, stop, code, installed, restored, names = run_ranks(_single_process, 1, root, init=False)[0]
    assert votes == [False, False, True, True] and stop == 3
    assert count == 2 and code == distckpt.preemption.EXIT_PREEMPTED == 75
    assert installed and restored  # handlers stay through save_and_exit; uninstall puts back
    assert names == ["latest.json", "step_000000000003"]  # one commit (and its pointer): no second save


# --- agreement across ranks -------------------------------------------------------------


def _stop_when_one_rank_is_signalled(rank, world, root, check_every, signal_at):
    os.environ.pop("SLURM_JOB_ID", None)
    pre = Preemption(check_every=check_every)
    with Checkpointer(root, {"t": torch.zeros(2)}, preemption=pre) as ckpt:
        for step in range(1, 40):
            time.sleep(0.01 * rank)  # the ranks drift apart, as real ones do
            if rank == world - 1 and step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            if ckpt.should_stop(step):
                return step, pre.count
    return None, pre.count


@pytest.mark.parametrize("check_every,expected", [(1, 5), (4, 8)])
def test_every_rank_stops_at_the_same_step_when_only_one_rank_is_signalled(root, check_every, expected):
    out = run_ranks(_stop_when_one_rank_is_signalled, 3, root, check_every, 5, timeout=120)
    assert [stop for stop, _ in out] == [expected] * 3
    assert [count for _, count in out] == [0, 0, 1]


# --- the final save: after an in-flight async save, and under more signals ------------


def _slow_writes(ckpt, before, after=0.0):
    """Make this rank's writes take longer, so that signals land inside a save."""
    write = ckpt._parts.engine.write

    def slow(*args):
        time.sleep(before)
        out = write(*args)
        time.sleep(after)
        return out

    ckpt._parts.engine.write = slow


def _job(rank, root, async_save, resume=False):
    model, optim, sched = make_training(seed=0)
    ddp = DDP(model)
    # the resumed run starts from the defaults: only a restored scaler state can match
    scaler = torch.amp.GradScaler("cpu") if resume else torch.amp.GradScaler("cpu", 1024.0, 3.0, 0.25, 7)
    parts = {"model": ddp, "optim": optim, "sched": sched, "scaler": scaler, "rng": distckpt.RNGState()}
    ckpt = Checkpointer(root, parts, async_save=async_save, preemption=True, timeout=90)
    return model, ddp, optim, sched, scaler, ckpt


def _snapshot(model, optim, scaler):
    return clone_state(model.state_dict()), clone_state(optim.state_dict()), scaler.state_dict()


def _signal_during_async_save(rank, world, root):
    os.environ.pop("SLURM_JOB_ID", None)
    model, ddp, optim, sched, scaler, ckpt = _job(rank, root, async_save=True)
    _slow_writes(ckpt, 1.5)
    torch.manual_seed(10 + rank)
    for step in range(1, 20):
        train(ddp, optim, sched, 1, seed=step)
        torch.rand(1)  # per-rank randomness that the RNG state must carry
        if step == 4:
            handle = ckpt.save(4)
        stop = ckpt.should_stop(step)
        if step == 4 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # while step 4 is still being written
            signalled_in_flight = not handle.done()
        if stop:
            waited_for_it = not handle.done()
            state = _snapshot(model, optim, scaler)
            try:
                ckpt.save_and_exit(step)
            except SystemExit as e:
                code = e.code
            return step, code, rank != 1 or signalled_in_flight, waited_for_it, state, torch.rand(1).item()
    raise AssertionError("never stopped")


def _resume(rank, world, root):
    model, ddp, optim, sched, scaler, ckpt = _job(rank, root, async_save=False, resume=True)
    info = ckpt.restore()
    ckpt.close()
    ckpt.preemption.uninstall()
    return info.step, _snapshot(model, optim, scaler), torch.rand(1).item()


def _assert_resumes_exactly(root, stopped):
    for (step, _, _, _, state, draw), (restored, state2, draw2) in zip(
        stopped, run_ranks(_resume, 2, root), strict=True
    ):
        assert restored == step
        assert tensors_equal(state, state2) and draw == draw2  # model, optimizer, scaler, RNG


def test_a_signal_during_an_in_flight_async_save_waits_for_it_then_saves_the_stop_step(root):
    out = run_ranks(_signal_during_async_save, 2, root, timeout=120)
    assert [(step, code) for step, code, *_ in out] == [(5, 75), (5, 75)]
    assert all(in_flight and waited for _, _, in_flight, waited, *_ in out)
    assert jobs.committed(root) == [4, 5]  # the in-flight save committed, then the final one
    _assert_resumes_exactly(root, out)


def _signals_during_final_save(rank, world, root):
    os.environ.pop("SLURM_JOB_ID", None)
    model, ddp, optim, sched, scaler, ckpt = _job(rank, root, async_save=False)
    torch.manual_seed(10 + rank)
    for step in range(1, 20):
        train(ddp, optim, sched, 1, seed=step)
        torch.rand(1)
        if step == 2:
            ckpt.save(2)
        if step == 3 and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        if ckpt.should_stop(step):
            break
    state = _snapshot(model, optim, scaler)
    _slow_writes(ckpt, 0.5, 0.5)
    stop = threading.Event()

    def pester():  # SIGTERM and SIGUSR1 every 50 ms for as long as the final save runs
        for i in range(1000):
            if stop.wait(0.05):
                return
            os.kill(os.getpid(), (signal.SIGTERM, signal.SIGUSR1)[i % 2])

    before = ckpt.preemption.count
    pesterer = threading.Thread(target=pester, daemon=True)
    pesterer.start()
    try:
        ckpt.save_and_exit(step)
    except SystemExit as e:
        code = e.code
    finally:
        stop.set()
        pesterer.join()
    return step, code, ckpt.preemption.count - before, None, state, torch.rand(1).item()


def test_signals_during_the_final_save_do_not_interrupt_or_corrupt_it(root):
    out = run_ranks(_signals_during_final_save, 2, root, timeout=120)
    assert [(step, code) for step, code, *_ in out] == [(3, 75), (3, 75)]
    assert all(extra >= 5 for _, _, extra, *_ in out)  # many signals arrived mid-save
    assert jobs.committed(root) == [2, 3]
    _assert_resumes_exactly(root, out)


# --- torchrun: restarts after a crash and after a preemption ---------------------------


@pytest.fixture
def reference(tmp_path_factory):
    return jobs.reference(tmp_path_factory)


def _workers(launcher_pid):
    """torchrun's worker processes below ``launcher_pid``, by rank."""
    found = {}
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            environ = proc.environ()
        except psutil.Error:
            continue
        if "RANK" in environ and "TORCHELASTIC_RESTART_COUNT" in environ:
            found[int(environ["RANK"])] = proc
    return found if len(found) == 2 else None


def _start(cmd, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=jobs.env(), cwd=jobs.REPO)


@pytest.mark.timeout(400)
def test_torchrun_restarts_a_killed_worker_and_the_job_ends_bit_exact(tmp_path, reference):
    ckpt_dir, log = str(tmp_path / "ckpt"), tmp_path / "job.log"
    proc = _start(jobs.torchrun_cmd(ckpt_dir, "--step-sleep", "0.1", launcher=["--max-restarts", "1"]), log)
    try:
        jobs.wait_for(lambda: any(s >= 20 for s in jobs.committed(ckpt_dir)), 180, "step 20 to be committed")
        jobs.wait_for(lambda: _workers(proc.pid), 30, "the workers")[1].kill()  # SIGKILL rank 1
        rc = proc.wait(timeout=300)
    finally:
        jobs.kill_tree(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    resumed = [int(s) for s in jobs.RESUMED.findall(text)]
    assert len(resumed) == 1 and 20 <= resumed[0] < jobs.STEPS and resumed[0] % 10 == 0, text[-4000:]
    assert jobs.result(text) == reference


@pytest.mark.timeout(400)
def test_torchrun_signals_stop_every_rank_save_and_restart_bit_exact(tmp_path, reference):
    """SIGTERM to one worker, later SIGUSR1 to the launcher (forwarded to the workers): each
    time every rank stops at one step, saves it, exits 75, torchrun restarts, they resume."""
    ckpt_dir, log = str(tmp_path / "ckpt"), tmp_path / "job.log"
    proc = _start(jobs.torchrun_cmd(ckpt_dir, "--step-sleep", "0.15", launcher=["--max-restarts", "2"]), log)
    try:
        jobs.wait_for(lambda: 10 in jobs.committed(ckpt_dir), 180, "step 10 to be committed")
        jobs.wait_for(lambda: _workers(proc.pid), 30, "the workers")[1].send_signal(signal.SIGTERM)
        jobs.wait_for(lambda: jobs.RESUMED.findall(log.read_text()), 180, "the first restart")
        first = max(jobs.committed(ckpt_dir))
        jobs.wait_for(lambda: max(jobs.committed(ckpt_dir)) > first, 180, "a save after the restart")
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=300)
    finally:
        jobs.kill_tree(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    stops = jobs.STOP.findall(text)
    steps = sorted({int(step) for _, step in stops})
    assert len(steps) == 2 and len(stops) == 4, text[-4000:]  # both ranks, twice, same step each time
    assert [int(s) for s in jobs.RESUMED.findall(text)] == steps
    assert text.count("failed (exitcode: 75)") >= 2  # how torchrun saw the preempted workers
    assert "forwarding SIGUSR1 to the workers" in text
    assert jobs.result(text) == reference


@pytest.mark.timeout(300)
def test_torchrun_sh_two_nodes_on_one_machine_match_the_single_node_run(tmp_path, reference):
    procs = _two_nodes(tmp_path, str(tmp_path / "ckpt"))
    text = _wait_all(procs, tmp_path, 240)
    assert jobs.result(text) == reference


def _two_nodes(tmp_path, ckpt_dir, extra=lambda node: [], launcher=()):
    """launch/torchrun.sh twice on this machine: two nodes of one worker each (c10d rendezvous)."""
    node = ["--nnodes", "2", "--nproc", "1", "--master", f"127.0.0.1:{free_port()}", "--run-id", uuid.uuid4().hex,
            *launcher]  # fmt: skip
    return [_start(jobs.torchrun_cmd(ckpt_dir, *extra(i), launcher=node), tmp_path / f"node{i}.log") for i in range(2)]


def _wait_all(procs, tmp_path, timeout, act=lambda: None):
    """``act()``, then every node's launcher exits 0; their logs, joined."""
    try:
        act()
        rcs = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            jobs.kill_tree(p)
    text = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert rcs == [0, 0], text[-4000:]
    return text


@pytest.mark.timeout(400)
def test_torchrun_restart_on_the_same_nodes_resumes_from_node_memory(tmp_path, reference):
    """Two torchrun nodes on one machine, each with its own node memory (``--local-dir``);
    only every 3rd save goes to ``--ckpt-dir``. A worker is SIGKILLed; torchrun restarts
    both nodes' workers and they resume from node memory, which survived, bit-exact."""
    ckpt_dir, mem = str(tmp_path / "ckpt"), tmp_path / "mem"
    extra = lambda i: ["--step-sleep", "0.1", "--local-dir", str(mem / f"node{i}"), "--upload-every", "3"]  # noqa: E731
    procs = _two_nodes(tmp_path, ckpt_dir, extra, launcher=["--max-restarts", "1"])

    def kill_a_worker():
        # every node commits its own copy: a step that one node holds and the other does not
        # yet cannot be assembled, and the restore rightly goes back to the one before
        def newest_on_both() -> int:
            return min(max(jobs.committed(str(mem / f"node{i}")), default=0) for i in range(2))

        jobs.wait_for(lambda: newest_on_both() >= 20, 180, "step 20 in both nodes' memory")
        jobs.wait_for(lambda: _workers_of(procs), 30, "the workers").kill()

    text = _wait_all(procs, tmp_path, 300, kill_a_worker)
    resumed = re.findall(r"resumed from step (\d+) \((\S+) tier\)", text)
    assert len(resumed) == 1 and int(resumed[0][0]) >= 20 and resumed[0][1] == "local", text[-4000:]
    assert jobs.result(text) == reference


def _workers_of(launchers):
    """The worker of rank 1, whichever launcher started it."""
    for launcher in launchers:
        for proc in psutil.Process(launcher.pid).children(recursive=True):
            try:
                environ = proc.environ()
            except psutil.Error:
                continue
            if environ.get("RANK") == "1" and "TORCHELASTIC_RESTART_COUNT" in environ:
                return proc
    return None
