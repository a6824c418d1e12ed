"""World size 1, no process group at all: the plain-script use."""

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import distckpt
from distckpt import Checkpointer, IncompatibleCheckpointError, Keep, NoCheckpointError
from tests.support.models import clone_state, make_training, tensors_equal, train


def _recoverables(model, optim, sched, **extra):
    return {"model": model, "optim": optim, "sched": sched, **extra}


def test_restore_without_any_checkpoint_returns_none(root):
    model, optim, sched = make_training()
    with Checkpointer(root, _recoverables(model, optim, sched)) as ckpt:
        assert ckpt.restore() is None
        assert ckpt.list() == []


def test_round_trip_is_bit_exact_and_training_continues_identically(root):
    model, optim, sched = make_training()
    train(model, optim, sched, 4)
    progress = {"epoch": 2, "seen": torch.tensor([5, 6])}
    with Checkpointer(root, _recoverables(model, optim, sched, progress=progress, step=4)) as ckpt:
        info = ckpt.save(4, meta={"val_loss": 0.5}).wait()
    assert info.step == 4 and info.meta == {"val_loss": 0.5} and info.nbytes > 0 and info.stats.stall_s > 0
    expected = {
        "model": clone_state(model.state_dict()),
        "optim": clone_state(optim.state_dict()),
        "sched": sched.state_dict(),
    }
    train(model, optim, sched, 3)
    reference = clone_state(model.state_dict())

    model2, optim2, sched2 = make_training(seed=99)
    progress2: dict = {}
    with Checkpointer(root, _recoverables(model2, optim2, sched2, progress=progress2, step=0)) as ckpt:
        got = ckpt.restore()
        assert got.step == 4 and got.meta == {"val_loss": 0.5}
        assert ckpt.recoverables["step"] == 4
    assert tensors_equal(model2.state_dict(), expected["model"])
    assert tensors_equal(optim2.state_dict(), expected["optim"])
    assert sched2.state_dict() == expected["sched"]
    assert progress2["epoch"] == 2 and torch.equal(progress2["seen"], torch.tensor([5, 6]))
    train(model2, optim2, sched2, 3)
    assert tensors_equal(model2.state_dict(), reference)


def test_rng_state_helper_restores_every_generator(root):
    rng = distckpt.RNGState()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    with Checkpointer(root, {"rng": rng}) as ckpt:
        ckpt.save(1)
        expected = (random.random(), np.random.rand(), torch.rand(1))
        random.seed(7), np.random.seed(7), torch.manual_seed(7)
        ckpt.restore()
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_restore_by_step_and_by_meta(root):
    t = torch.zeros(3)
    with Checkpointer(root, {"t": t}) as ckpt:
        for step, loss, kind in [(1, 0.9, "full"), (2, 0.2, "part"), (3, 0.5, "full"), (4, float("nan"), "part")]:
            t.fill_(step)
            ckpt.save(step, meta={"loss": loss, "kind": kind})
        assert ckpt.restore(step=2).step == 2 and t[0] == 2
        assert ckpt.restore(min_key="loss").step == 2
        assert ckpt.restore(max_key="loss").step == 1 and t[0] == 1
        assert ckpt.restore(predicate=lambda c: c.meta["kind"] == "full").step == 3
        assert ckpt.find(min_key="loss").step == 2
        assert ckpt.restore().step == 4 and t[0] == 4
        with pytest.raises(NoCheckpointError, match="step 7"):
            ckpt.restore(step=7)
        assert ckpt.restore(predicate=lambda c: False) is None
        with pytest.raises(ValueError):
            ckpt.restore(step=1, min_key="loss")


def test_saving_a_committed_step_again_fails_and_keeps_the_original(root):
    t = torch.ones(2)
    with Checkpointer(root, {"t": t}) as ckpt:
        ckpt.save(5)
        t.fill_(9)
        with pytest.raises(distckpt.CheckpointError, match="already committed"):
            ckpt.save(5)
        ckpt.restore(step=5)
        assert torch.equal(t, torch.ones(2))
        assert not [n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-"))]


def test_step_directory_is_a_plain_dcp_checkpoint(root):
    model, optim, sched = make_training()
    train(model, optim, sched, 2)
    with Checkpointer(root, _recoverables(model, optim, sched)) as ckpt:
        info = ckpt.save(2).wait()
    fresh = make_training(seed=5)[0]
    target = {"model": fresh.state_dict()}
    dcp.load(target, checkpoint_id=info.url, no_dist=True)
    assert tensors_equal(target["model"], model.state_dict())


def test_shape_mismatch_names_the_key_and_both_shapes(root):
    model, optim, sched = make_training(width=16)
    with Checkpointer(root, {"model": model}) as ckpt:
        ckpt.save(1)
    other = make_training(width=32)[0]
    with Checkpointer(root, {"model": other}) as ckpt:
        with pytest.raises(
            IncompatibleCheckpointError,
            match=r"model\.0\.weight: checkpoint has shape \[16, 8\], this job has \[32, 8\]",
        ):
            ckpt.restore()


def test_missing_and_extra_keys_are_reported_and_strict_false_loads_the_rest(root):
    small = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with Checkpointer(root, {"model": small, "extra": torch.ones(2)}) as ckpt:
        ckpt.save(1)
    bigger = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    with Checkpointer(root, {"model": bigger, "ema": torch.zeros(1)}) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match=r"holds no \['ema'\]"):
            ckpt.restore()
    with Checkpointer(root, {"model": bigger}) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match=r"model: 2 keys not in the checkpoint"):
            ckpt.restore()
        ckpt.restore(strict=False)
    assert torch.equal(bigger[0].weight, small[0].weight)


def test_register_hooks_teaches_a_new_type(root):
    class Counter:
        def __init__(self):
            self.n = 0

    distckpt.register_hooks(Counter, save=lambda c: {"n": c.n}, load=lambda c, s: setattr(c, "n", s["n"]))
    c = Counter()
    c.n = 41
    with Checkpointer(root, {"c": c}) as ckpt:
        ckpt.save(1)
        c.n = 0
        ckpt.restore()
    assert c.n == 41


def test_unknown_types_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="register_hooks"):
        Checkpointer("/tmp/unused-distckpt", {"x": object()})


def test_uncommitted_work_is_never_listed_and_is_cleaned_up(root):
    t = torch.ones(1)
    with Checkpointer(root, {"t": t}) as ckpt:
        ckpt.save(1)
    # an interrupted save: a temporary sibling, and a step directory with no manifest
    os.makedirs(os.path.join(root, ".tmp-step_000000000002-abc"))
    open(os.path.join(root, ".tmp-step_000000000002-abc", "__0_0.distcp"), "wb").write(b"partial")
    os.makedirs(os.path.join(root, "step_000000000003"))
    with Checkpointer(root, {"t": t}) as ckpt:
        assert [c.step for c in ckpt.list()] == [1]
        assert ckpt.restore().step == 1
        assert sorted(os.listdir(root)) == [".distckpt-lock", "latest.json", "step_000000000001"]


def test_retention_never_runs_before_commit(root):
    t = torch.ones(1)
    with Checkpointer(root, {"t": t}, keep=Keep(last=1)) as ckpt:
        ckpt.save(1)
        with pytest.raises(distckpt.CheckpointError):
            ckpt.save(1)  # fails before commit: step 1 must survive
        assert [c.step for c in ckpt.list()] == [1]
