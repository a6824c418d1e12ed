"""snapshot="overlap": the optimizers' part of the staging copy runs after save() returns,
and every optimizer step waits for it (``distckpt/step_guard.py``)."""

import threading
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.optimizer import _global_optimizer_pre_hooks

from distckpt import Checkpointer, copies, staging
from distckpt.errors import CheckpointError
from distckpt.recoverables import Recoverables
from distckpt.step_guard import StepGuard
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train


def _bn_training(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _train(model, optim, seed):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    optim.zero_grad()
    model(x).square().mean().backward()
    optim.step()


def _gate_the_snapshot_thread():
    """Keep the deferred copy from starting until the returned event is set."""
    gate = threading.Event()
    copies.snapshot_thread().submit(gate.wait)
    return gate


def _step_in_thread(optim):
    """Start ``optim.step()`` (grads already set) on a thread; the thread."""
    stepper = threading.Thread(target=optim.step)
    stepper.start()
    return stepper


def test_the_next_optimizer_step_waits_for_the_copy_and_the_forward_pass_changes_nothing_saved(root):
    model, optim = _bn_training()
    for s in range(2):
        _train(model, optim, s)
    with Checkpointer(root, {"model": model, "optim": optim}, async_save=True, snapshot="overlap") as ckpt:
        expected = clone_state(model.state_dict()), clone_state(optim.state_dict())
        gate = _gate_the_snapshot_thread()
        handle = ckpt.save(2)
        # the next iteration: its forward changes BatchNorm's running statistics at once...
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
        model(x).square().mean().backward()
        assert not torch.equal(model[1].running_mean, expected[0]["1.running_mean"])
        # ...and its optimizer step must wait until the parameters and moments are copied
        stepper = _step_in_thread(optim)
        time.sleep(0.3)
        held = stepper.is_alive()
        unchanged = tensors_equal(model[0].weight.detach(), expected[0]["0.weight"])
        gate.set()
        stepper.join(30)
        info = handle.wait()
    assert held and unchanged
    assert not torch.equal(model[0].weight.detach(), expected[0]["0.weight"])  # the step did run after
    assert info.stats.held_s >= 0.2  # what the step waited is reported with the save
    model2, optim2 = _bn_training(seed=5)
    with Checkpointer(root, {"model": model2, "optim": optim2}) as ckpt:
        assert ckpt.restore().step == 2
    assert tensors_equal(model2.state_dict(), expected[0]) and tensors_equal(optim2.state_dict(), expected[1])


def test_only_what_an_optimizer_steps_is_deferred_and_close_takes_the_hook_off():
    model, optim = _bn_training()
    _train(model, optim, 0)
    recs = Recoverables()
    for name, obj in {"model": model, "optim": optim, "extra": torch.ones(3)}.items():
        recs.add(name, obj)
    hooks = len(_global_optimizer_pre_hooks)
    guard = StepGuard(recs.optimizers)
    assert len(_global_optimizer_pre_hooks) == hooks + 1
    _, _, tensors = recs.snapshot(full=False)
    later = guard.later(tensors)
    params = {f"model.{n}" for n, _ in model.named_parameters()}
    buffers = {f"model.{n}" for n, _ in model.named_buffers()}
    assert params <= later and not (buffers & later) and "extra" not in later
    moments = [n for n in tensors if n.startswith("optim.") and tensors[n].numel() > 1]
    assert moments and set(moments) <= later  # Adam's exp_avg / exp_avg_sq
    guard.close()
    assert len(_global_optimizer_pre_hooks) == hooks


def test_a_failed_deferred_copy_fails_its_save_not_training(root, monkeypatch):
    model, optim = _bn_training()
    _train(model, optim, 0)
    with Checkpointer(root, {"model": model, "optim": optim}, async_save=True, snapshot="overlap") as ckpt:
        ckpt.save(1).wait()
        kept = clone_state(model.state_dict())
        real = staging.copy_pairs

        def failing(pairs, *args, **kwargs):
            if threading.current_thread().name.startswith("distckpt-snapshot"):
                raise OSError("injected: the deferred copy failed")
            return real(pairs, *args, **kwargs)

        monkeypatch.setattr(staging, "copy_pairs", failing)
        handle = ckpt.save(2)
        _train(model, optim, 1)  # the step does not raise the copy's error
        with pytest.raises(CheckpointError, match="deferred copy failed"):
            handle.wait()
        monkeypatch.setattr(staging, "copy_pairs", real)
        assert [c.step for c in ckpt.list()] == [1]
    model2, optim2 = _bn_training(seed=5)
    with Checkpointer(root, {"model": model2, "optim": optim2}) as ckpt:
        assert ckpt.restore().step == 1
    assert tensors_equal(model2.state_dict(), kept)


def test_overlapped_saves_hand_the_writer_the_same_views_every_save(root):
    """The views of a new layout are made on the snapshot thread; the writer still gets the
    very same view objects save after save (the plan cache recalls what it derived)."""
    model, optim = _bn_training()
    with Checkpointer(root, {"model": model, "optim": optim}, async_save=True, snapshot="overlap") as ckpt:
        for step in range(4):
            _train(model, optim, step)
            ckpt.save(step)
        ckpt.wait()
        assert ckpt._parts.engine.plans.recalled == 3


def test_overlap_needs_async_saves_and_a_known_value():
    with pytest.raises(ValueError, match="async_save=True"):
        Checkpointer("/tmp/never-made", snapshot="overlap")
    with pytest.raises(ValueError, match="snapshot must be one of"):
        Checkpointer("/tmp/never-made", async_save=True, snapshot="lazy")


def _overlap_job(rank, world, root, mode):
    model, optim, sched = make_training(seed=3)
    ddp = DDP(model)
    ckpt = Checkpointer(root, {"model": ddp, "optim": optim}, mode=mode, async_save=True, snapshot="overlap")
    snapshots, held = {}, []
    for step in range(1, 5):
        train(ddp, optim, sched, 1, seed=step)
        if step % 2 == 0:
            gate = _gate_the_snapshot_thread()
            ckpt.save(step)
            snapshots[step] = clone_state(model.state_dict()), clone_state(optim.state_dict())
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            stepper = _step_in_thread(optim)
            time.sleep(0.3)
            held.append(stepper.is_alive())
            gate.set()
            stepper.join(30)
            t = torch.ones(1)
            torch.distributed.all_reduce(t)  # training-thread collectives while the save runs
    ckpt.close()
    ok = []
    for step, (model_state, optim_state) in snapshots.items():
        check, check_optim, _ = make_training(seed=9)
        with Checkpointer(root, {"model": check, "optim": check_optim}, mode=mode) as reader:
            assert reader.restore(step=step).step == step
        ok.append(
            tensors_equal(check.state_dict(), model_state) and tensors_equal(check_optim.state_dict(), optim_state)
        )
    return ok, held


@pytest.mark.parametrize("mode", ["sharded", "chief"])
def test_two_ranks_restore_the_state_at_save_although_they_step_right_after(root, mode):
    out = run_ranks(_overlap_job, 2, root, mode, timeout=120)
    assert [ok for ok, _ in out] == [[True, True], [True, True]]
    # every rank that stages waits; in chief mode rank 1 stages nothing and steps at once
    assert [held for _, held in out] == ([[True, True]] * 2 if mode == "sharded" else [[True, True], [False, False]])
