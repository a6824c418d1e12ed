"""Save decisions are collective: ranks whose clocks disagree still save at the same steps,
and ``best.json``/``latest.json`` name what the chief committed."""

import json
import os

import torch

import distckpt
from distckpt import SaveEverySeconds, SaveEverySteps
from tests.support.harness import run_ranks


def _skewed_clocks(rank, world, root):
    clock = {"t": 1000.0 * rank}  # rank 1's host clock is 1000 s ahead and runs at another rate
    schedule = SaveEverySteps(50) | SaveEverySeconds(100, clock=lambda: clock["t"])
    model = torch.nn.Linear(4, 4)
    saved = []
    with distckpt.Checkpointer(
        root, {"model": model}, save_policy=schedule, keep=distckpt.KeepBest(1, metric="loss")
    ) as ckpt:
        for step in range(1, 41):
            clock["t"] += 10.0 * (1 + rank)  # rank 0: 10 s per step, rank 1: 20 s per step
            if ckpt.maybe_save(step, meta={"loss": abs(step - 25)}):
                saved.append(step)
    return saved


def test_ranks_with_different_clocks_save_the_same_steps_and_pointers_follow(root):
    out = run_ranks(_skewed_clocks, 2, root, timeout=180)
    assert out[0] == out[1] == [11, 21, 31]  # the chief's clock: 100 s after its start (step 1), then per save
    latest = json.load(open(os.path.join(root, "latest.json")))
    best = json.load(open(os.path.join(root, "best.json")))
    assert latest["step"] == 31 and best["step"] == 21  # |21 - 25| is the best loss
    reader = distckpt.open(root)
    assert reader.pointer("latest").step == 31 and reader.pointer("best").step == 21
    assert [c.step for c in reader.list()] == [21, 31]  # KeepBest(1) plus the newest
