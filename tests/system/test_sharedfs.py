"""A job whose ranks see the checkpoint root through different clients of one shared
filesystem (two sshfs mounts with independent caches: an adversarial NFS stand-in).

The chief lists, chooses and broadcasts; the other ranks only read the paths it chose. So
even when a rank's own view of the directory is stale, every rank restores the same step.
"""

import os

import pytest
import torch

from distckpt import Checkpointer, Keep
from tests.support.harness import run_ranks
from tests.support.sharedfs import SharedFS


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    fs = SharedFS(str(tmp_path_factory.mktemp("sharedfs")))
    yield fs
    fs.close()


def _state(step):
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(128, 256, generator=g), "b": torch.randn(77, generator=g)}


def _job(rank, world, mounts, steps, async_save):
    root = os.path.join(mounts[rank], "run")  # each rank reaches the same files via its own client
    holder = {"s": _state(0)}
    with Checkpointer(root, {"h": holder}, keep=Keep(last=2), async_save=async_save) as ckpt:
        info = ckpt.restore()
        start = info.step if info else 0
        seen_before = [c.step for c in ckpt.list()]  # this rank's own (possibly stale) view
        for step in range(start + 1, start + steps + 1):
            holder["s"] = _state(step)
            ckpt.save(step)
        ckpt.wait()
        holder["s"] = _state(999)
        restored = ckpt.restore()
        exact = all(torch.equal(holder["s"][k], v) for k, v in _state(restored.step).items())
    return start, restored.step, exact, seen_before


def test_ranks_on_different_clients_agree_on_every_restore(shared):
    first = run_ranks(_job, 2, shared.mounts, 4, True)
    assert [r[:3] for r in first] == [(0, 4, True), (0, 4, True)]
    # a restarted job: both ranks resume from the chief's newest step, whatever they list
    second = run_ranks(_job, 2, shared.mounts, 3, False)
    assert [r[:3] for r in second] == [(4, 7, True), (4, 7, True)]
    # retention (through the chief's client) kept exactly the two newest steps
    names = sorted(n for n in os.listdir(shared.src + "/run") if n.startswith("step_"))
    assert names == ["step_000000000006", "step_000000000007"]
