"""Crash consistency: SIGKILL a saving job at random instants, many times.

After every kill the newest listed step must restore bit-exact, every save that had
returned must be durable (listed), and a restart must resume from the newest step.
"""

import os
import random
import signal
import time

import torch

from distckpt import Checkpointer, Keep
from tests.support.harness import _context

SHAPES = [(256, 1024), (1024,), (512, 512), (3, 7, 11), (64, 64)]


def expected(step):
    g = torch.Generator().manual_seed(step)
    return {f"t{i}": torch.randn(*s, generator=g) for i, s in enumerate(SHAPES)}


class Holder:
    def __init__(self):
        self.tensors = {k: torch.zeros_like(v) for k, v in expected(0).items()}

    def state_dict(self):
        return self.tensors

    def load_state_dict(self, state):
        for k, v in state.items():
            self.tensors[k].copy_(v)


def _saver(root, conn, async_save):
    holder = Holder()
    ckpt = Checkpointer(
        root, {"h": holder, "step": 0}, keep=Keep(last=2, every_steps=7), write_threads=2, async_save=async_save
    )
    info = ckpt.restore()
    start = info.step if info else 0
    ok = info is None or all(torch.equal(holder.tensors[k], v) for k, v in expected(start).items())
    conn.send(("resumed", start, ok))
    for step in range(start + 1, start + 100_000):
        for k, v in expected(step).items():
            holder.tensors[k].copy_(v)
        handle = ckpt.save(step)
        if not async_save:
            conn.send(("saved", step))
        elif step > start + 1:
            conn.send(("saved", step - 1))  # the previous save has finished before this one started
        del handle


def _verify(root):
    holder = Holder()
    with Checkpointer(root, {"h": holder, "step": 0}) as ckpt:
        listed = [c.step for c in ckpt.list()]
        info = ckpt.restore()
        if not listed:  # killed before its first commit (a busy machine): nothing to restore
            assert info is None
            return 0
        assert info is not None and info.step == max(listed)
    for k, v in expected(info.step).items():
        assert torch.equal(holder.tensors[k], v), f"step {info.step}: {k} differs"
    return info.step


def _trials(root, n, async_save, seed):
    rng = random.Random(seed)
    ctx = _context()
    newest, progressed, mid_save = 0, 0, 0
    for trial in range(n):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_saver, args=(root, child, async_save), daemon=True)
        proc.start()
        assert parent.poll(60), "child did not start"
        kind, start, ok = parent.recv()
        assert kind == "resumed" and ok, f"trial {trial}: restart resumed from step {start} but state differs"
        assert start == newest, f"trial {trial}: resumed at {start}, newest committed was {newest}"
        last_returned = start
        if trial % 2:  # kill at a random instant after some save has returned (progress is sure)
            assert parent.poll(120), "no save returned within 120 s"
            last_returned = parent.recv()[1]
            time.sleep(rng.uniform(0.0, 0.25))
        else:  # kill at a random instant from the start, maybe before the first commit
            time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        mid_save += any(n.startswith((".tmp-", ".trash-")) for n in os.listdir(root))
        while parent.poll():
            msg = parent.recv()
            last_returned = max(last_returned, msg[1])
        newest = _verify(root)
        assert newest >= last_returned, f"trial {trial}: save of step {last_returned} returned but newest is {newest}"
        progressed += newest > start
    return progressed, mid_save


def test_sigkill_at_random_instants_never_loses_the_newest_commit(root):
    progressed, mid_save = _trials(root, 30, async_save=False, seed=1)
    assert progressed >= 15 and mid_save >= 3  # kills landed between saves and inside them
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]  # leftovers cleaned on restart


def test_sigkill_during_async_saves(root):
    progressed, mid_save = _trials(root, 15, async_save=True, seed=2)
    assert progressed >= 7 and mid_save >= 1
