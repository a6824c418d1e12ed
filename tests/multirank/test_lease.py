"""One writing job per root: a second job is refused, a taken-over job is fenced, restarts resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from distckpt import Checkpointer, CheckpointError, DistckptError
from distckpt.layout.lease import LOCK
from tests.support import REPO

HOLDER = textwrap.dedent("""
    import json, sys, time, torch, distckpt
    root, go, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    t = torch.full((4,), 6.0)
    ckpt = distckpt.Checkpointer(root, {"t": t}, storage_options=opts or None)
    print("holding", flush=True)
    while not __import__("os").path.exists(go):
        time.sleep(0.05)
    try:
        ckpt.save(6)
        print("saved 6", flush=True)
    except distckpt.CheckpointError as e:
        print("refused:", e, flush=True)
    ckpt.close()
""")


def _start_holder(root, tmp_path, opts=None, env=None):
    go = str(tmp_path / "go")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root, go, json.dumps(opts or {})],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
    return proc, go


def test_a_second_job_is_refused_with_who_holds_the_root(root, tmp_path):
    proc, go = _start_holder(root, tmp_path)
    try:
        with pytest.raises(DistckptError, match=rf"in use by another job \(process:.*pid {proc.pid}.*delete .*{LOCK}"):
            Checkpointer(root, {"t": torch.zeros(4)})
        open(go, "w").close()
        out, _ = proc.communicate(timeout=60)
        assert "saved 6" in out  # the holder was not disturbed
    finally:
        proc.kill()


def test_a_killed_job_is_taken_over_on_the_same_host(root, tmp_path):
    proc, _ = _start_holder(root, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(root, LOCK))  # a crash leaves the lease behind
    with Checkpointer(root, {"t": torch.ones(4)}) as ckpt:
        ckpt.save(1)
    assert not os.path.exists(os.path.join(root, LOCK))  # released on close


def test_the_same_job_restarted_takes_over_at_once(root, tmp_path, monkeypatch):
    proc, go = _start_holder(root, tmp_path, env={"SLURM_JOB_ID": "4242"})
    try:
        lock = os.path.join(root, LOCK)
        before = json.load(open(lock))
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued instance of the same job
        with Checkpointer(root, {"t": torch.ones(4)}) as ckpt:
            now = json.load(open(lock))
            assert now["job"] == before["job"] and now["job"].endswith(":4242")
            assert now["nonce"] != before["nonce"] and now["pid"] == os.getpid()
            ckpt.save(1)
            open(go, "w").close()  # the old instance, still running, is fenced off
            out, _ = proc.communicate(timeout=60)
            assert "refused:" in out and "taken over by another job" in out
            assert [c.step for c in ckpt.list()] == [1]
    finally:
        proc.kill()


def test_a_taken_over_job_is_fenced_and_never_interleaves(root, tmp_path):
    proc, go = _start_holder(root, tmp_path)
    try:
        lock = os.path.join(root, LOCK)
        doc = json.load(open(lock))
        doc["refreshed"] = time.time() - 7200  # the holder looks hung for two hours
        json.dump(doc, open(lock, "w"))
        t = torch.full((4,), 5.0)
        with Checkpointer(root, {"t": t}) as ckpt:  # takes over the stale lease
            ckpt.save(5)
            open(go, "w").close()  # now the old holder tries to commit step 6
            out, _ = proc.communicate(timeout=60)
            assert "refused:" in out and "taken over by another job" in out
            assert [c.step for c in ckpt.list()] == [5]
            assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    finally:
        proc.kill()


def test_a_read_only_checkpointer_needs_no_lease(root, tmp_path):
    with Checkpointer(root, {"t": torch.full((4,), 3.0)}) as writer:
        writer.save(3)
        t = torch.zeros(4)
        reader = Checkpointer(root, {"t": t}, read_only=True)
        assert reader.restore().step == 3 and torch.equal(t, torch.full((4,), 3.0))
        with pytest.raises(DistckptError, match="read_only"):
            reader.save(4)
        reader.close()


def test_a_second_job_is_refused_on_s3_too(s3_root, s3_options, tmp_path):
    proc, go = _start_holder(s3_root, tmp_path, opts=s3_options)
    try:
        with pytest.raises(DistckptError, match="in use by another job"):
            Checkpointer(s3_root, {"t": torch.zeros(4)}, storage_options=s3_options)
        open(go, "w").close()
        out, _ = proc.communicate(timeout=60)
        assert "saved 6" in out
    finally:
        proc.kill()


def test_fencing_failure_reaches_the_caller_as_a_checkpoint_error(root):
    with Checkpointer(root, {"t": torch.ones(2)}) as ckpt:
        lock = os.path.join(root, LOCK)
        doc = json.load(open(lock))
        doc["nonce"] = "someone-else"
        json.dump(doc, open(lock, "w"))
        with pytest.raises(CheckpointError, match="taken over"):
            ckpt.save(1)
        assert ckpt.list() == []


SAVER = textwrap.dedent("""
    import json, sys, time, torch, distckpt
    root, opts = sys.argv[1], json.loads(sys.argv[2])
    t = torch.zeros(4)
    ckpt = distckpt.Checkpointer(root, {"t": t}, storage_options=opts)
    print("holding", flush=True)
    for step in range(1, 5):
        time.sleep(0.5)
        t.fill_(step)
        ckpt.save(step)
        print("saved", step, flush=True)
    ckpt.close()
""")


@pytest.mark.parametrize("server", ["moto", "s3rver"])
def test_a_second_job_on_a_live_s3_root_is_refused_and_the_first_keeps_every_save(server, request, monkeypatch):
    # issue #13: on s3rver, which ignores If-None-Match, job B used to take the lease silently
    # and job A's next save failed; now B is told at open, and A goes on
    from tests.support.s3 import s3_bucket

    monkeypatch.setenv("DISTCKPT_LEASE_SETTLE_S", "1")
    url, opts = s3_bucket(request, server)
    job_a = subprocess.Popen(
        [sys.executable, "-c", SAVER, url, json.dumps(opts)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
    )
    try:
        assert job_a.stdout.readline().strip() == "holding", job_a.stderr.read()
        assert job_a.stdout.readline().strip() == "saved 1"
        with pytest.raises(DistckptError, match=rf"in use by another job \(process:.*pid {job_a.pid}"):
            Checkpointer(url, {"t": torch.zeros(4)}, storage_options=opts)
        out, err = job_a.communicate(timeout=120)
    finally:
        job_a.kill()
    assert job_a.returncode == 0, err
    assert out.split("\n")[:-1] == [f"saved {s}" for s in range(2, 5)]  # every save after B tried
    t = torch.zeros(4)
    with Checkpointer(url, {"t": t}, storage_options=opts, read_only=True) as reader:
        assert [c.step for c in reader.list()] == [1, 2, 3, 4]
        assert reader.restore().step == 4 and torch.equal(t, torch.full((4,), 4.0))
