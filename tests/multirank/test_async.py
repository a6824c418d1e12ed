"""Async saves: snapshot semantics, error delivery, flushing, and the staging pool."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import distckpt
from distckpt import Checkpointer
from distckpt.arena import ALIGN
from distckpt.staging import DirectStager, PoolStager
from tests.support import REPO
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train


def test_tensors_changed_right_after_save_are_not_in_the_checkpoint(root):
    model, optim, sched = make_training()
    train(model, optim, sched, 2)
    with Checkpointer(root, {"model": model, "optim": optim}, async_save=True) as ckpt:
        expected = clone_state(model.state_dict()), clone_state(optim.state_dict())
        handle = ckpt.save(2)
        with torch.no_grad():  # the optimizer step a training loop would run next
            for p in model.parameters():
                p.mul_(-3.0).add_(7.0)
        train(model, optim, sched, 1)
        info = handle.wait()
    assert info.step == 2 and info.stats.stall_s < info.stats.total_s
    model2, optim2, _ = make_training(seed=5)
    with Checkpointer(root, {"model": model2, "optim": optim2}) as ckpt:
        ckpt.restore()
    assert tensors_equal(model2.state_dict(), expected[0]) and tensors_equal(optim2.state_dict(), expected[1])


def _break_root(root):
    shutil.rmtree(root)
    open(root, "w").write("not a directory any more")  # every later write fails for real


def test_a_background_failure_is_raised_once_at_the_next_wait(root):
    t = torch.ones(8)
    ckpt = Checkpointer(root, {"t": t}, async_save=True)
    _break_root(root)
    ckpt.save(1)  # returns: the failure happens on the background thread
    with pytest.raises(distckpt.CheckpointError, match="step 1"):
        ckpt.wait()
    ckpt.wait()  # reported once: not again
    ckpt.close()


def test_a_background_failure_is_raised_at_the_next_save(root):
    t = torch.ones(8)
    ckpt = Checkpointer(root, {"t": t}, async_save=True)
    _break_root(root)
    ckpt.save(1)
    with pytest.raises(distckpt.CheckpointError, match="step 1"):
        ckpt.save(2)
    ckpt.close()  # nothing left to report


def _async_failure_on_rank1(rank, world, root):
    class Flaky:
        def state_dict(self):
            if rank == 1:
                raise OSError("quota exceeded")
            return {}

        def load_state_dict(self, s):
            pass

    ckpt = Checkpointer(root, {"t": torch.ones(4), "f": Flaky()}, async_save=True, timeout=60)
    ckpt.save(1)
    try:
        ckpt.close()
    except distckpt.CheckpointError as e:
        return sorted(e.errors), "quota exceeded" in str(e)
    return None


def test_async_failure_on_one_rank_reaches_every_rank(root):
    assert run_ranks(_async_failure_on_rank1, 2, root, timeout=90) == [([1], True), ([1], True)]


def test_interpreter_exit_flushes_pending_saves(root):
    script = textwrap.dedent(f"""
        import torch, distckpt
        ckpt = distckpt.Checkpointer({root!r}, {{"t": torch.arange(1_000_000.0)}}, async_save=True)
        ckpt.save(7)
        # no close(): the interpreter exits with the save still in flight
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=REPO)
    t = torch.zeros(1_000_000)
    with Checkpointer(root, {"t": t}) as ckpt:
        assert ckpt.restore().step == 7
    assert torch.equal(t, torch.arange(1_000_000.0))


def test_pool_is_reserved_up_front_exactly_sized_and_reused(root):
    model, optim, sched = make_training(width=64)
    ckpt = Checkpointer(root, {"model": model, "optim": optim}, async_save=True)
    stager = ckpt._parts.saves.stager
    assert isinstance(stager, PoolStager)
    stager.wait_reserved()
    reserved = stager.capacity
    # params + AdamW's two moments + step scalars, each slice rounded up to ALIGN bytes only
    params = sum(-(-p.numel() * 4 // ALIGN) * ALIGN for p in model.parameters())
    assert 3 * params <= reserved <= 3 * params + ALIGN * len(list(model.parameters()))
    train(model, optim, sched, 1)  # optimizer state appears; the reservation already covered it
    pointers = set()
    for step in range(1, 6):
        ckpt.save(step).wait()
        pointers |= {a.buf.data_ptr() for a in stager.host._free}
    assert stager.capacity == reserved and len(pointers) == 1
    ckpt.close()


def test_over_budget_state_is_written_directly_and_saves_block(root, caplog):
    t = torch.arange(100_000.0)
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        ckpt = Checkpointer(root, {"t": t}, async_save=True, staging_budget=1000)
    assert isinstance(ckpt._parts.saves.stager, DirectStager) and "exceeds the staging budget" in caplog.text
    handle = ckpt.save(1)
    assert handle.done()  # blocking: the live tensors were written before save() returned
    t.zero_()
    ckpt.restore()
    assert torch.equal(t, torch.arange(100_000.0))
    ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_save_stats_are_reported(root, caplog, async_save):
    t = torch.randn(256, 1024)
    with caplog.at_level(logging.INFO, logger="distckpt"), Checkpointer(root, {"t": t}, async_save=async_save) as ckpt:
        info = ckpt.save(1).wait()
    s = info.stats
    assert s.bytes_written >= t.numel() * 4
    # a background save stages a copy; a synchronous one writes straight from the tensors
    assert s.staging_bytes >= t.numel() * 4 if async_save else s.staging_bytes == 0
    assert 0 < s.stall_s and 0 < s.write_s and s.total_s >= s.write_s and s.write_gbps > 0
    assert set(s.as_dict()) >= {"stall_s", "stage_s", "write_s", "commit_s", "bytes_written", "write_gbps"}
    assert "step 1 committed (primary): stall" in caplog.text


RSS_SCRIPT = """
import json, os, sys, psutil, torch, distckpt
root = sys.argv[1]
state = {f"t{i}": torch.randn(1024, 1024) for i in range(16)}  # 64 MiB
ckpt = distckpt.Checkpointer(root, {"s": state}, async_save=True, keep=distckpt.Keep(last=2))
rss = {}
for step in range(1, 51):
    for t in state.values():
        t.add_(1.0)
    ckpt.save(step)
    ckpt.wait()
    if step in (3, 50):
        rss[step] = psutil.Process().memory_info().rss
ckpt.close()
print(json.dumps(rss))
"""


def test_host_memory_stays_flat_across_many_saves(root):
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, root], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    growth = rss["50"] - rss["3"]
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB between the 3rd and the 50th save"


def test_retention_running_beside_a_save_never_removes_its_work(root):
    # the janitor of one save's retention runs while the next save writes: it must not
    # take the in-flight work directory for an interrupted save's leftovers
    state = {f"t{i}": torch.randn(256, 1024) for i in range(8)}
    with Checkpointer(root, {"s": state}, async_save=True, keep=distckpt.Keep(last=1), write_threads=1) as ckpt:
        stop = threading.Event()

        def janitor():
            while not stop.is_set():
                ckpt._parts.saves.janitor._retain()

        thread = threading.Thread(target=janitor)
        thread.start()
        try:
            for step in range(1, 8):
                ckpt.save(step)
            ckpt.wait()
        finally:
            stop.set()
            thread.join()
        assert [c.step for c in ckpt.list()] == [7]
