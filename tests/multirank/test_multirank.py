"""Real multi-process jobs (gloo on CPU): sharded and chief saves, agreement, failures."""

import json
import os
import threading

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distckpt
from distckpt import Checkpointer
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train


def _ddp_job(rank, world, root, mode, steps):
    model, optim, sched = make_training(seed=0)
    ddp = DDP(model)
    torch.manual_seed(100 + rank)
    ckpt = Checkpointer(root, {"model": ddp, "optim": optim, "sched": sched, "rng": distckpt.RNGState()}, mode=mode)
    start = ckpt.restore()
    first = start.step if start else 0
    for step in range(first + 1, steps + 1):
        train(ddp, optim, sched, 1, seed=step * 10 + rank)
        torch.rand(1)  # consume per-rank randomness, which the RNG state must carry
        if step % 2 == 0:
            ckpt.save(step, meta={"loss": 1.0 / step})
    ckpt.close()
    return clone_state(model.state_dict()), clone_state(optim.state_dict()), torch.rand(1).item()


def _manifest(root, step):
    return json.load(open(os.path.join(root, f"step_{step:012d}", "manifest.json")))


def _resume_matches_uninterrupted(tmp_path, mode):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    reference = run_ranks(_ddp_job, 2, full, mode, 6)
    run_ranks(_ddp_job, 2, part, mode, 4)  # stops after committing step 4
    resumed = run_ranks(_ddp_job, 2, part, mode, 6)
    for (m1, o1, r1), (m2, o2, r2) in zip(reference, resumed, strict=True):
        assert tensors_equal(m1, m2) and tensors_equal(o1, o2) and r1 == r2
    return _manifest(part, 6)


def test_sharded_ddp_job_resumes_bit_exact(tmp_path):
    man = _resume_matches_uninterrupted(tmp_path, "sharded")
    assert man["world_size"] == 2 and man["mode"] == "sharded"
    assert {f["rank"] for f in man["files"].values()} == {0, 1}  # both ranks wrote shards


def test_chief_mode_writes_on_rank0_only_and_every_rank_restores(tmp_path):
    man = _resume_matches_uninterrupted(tmp_path, "chief")
    assert man["mode"] == "chief" and {f["rank"] for f in man["files"].values()} == {0}


def _fails_on_rank1(rank, world, root):
    class Flaky:
        fail = True

        def state_dict(self):
            if rank == 1 and self.fail:
                raise RuntimeError("disk says no")
            return {"v": 1}

        def load_state_dict(self, s):
            pass

    flaky = Flaky()
    t = torch.full((4,), float(rank))
    with Checkpointer(root, {"t": t, "flaky": flaky}, timeout=60) as ckpt:
        try:
            ckpt.save(1)
        except distckpt.CheckpointError as e:
            err = (sorted(e.errors), "disk says no" in str(e))
        flaky.fail = False
        ckpt.save(2)  # the job goes on; collectives are still aligned
        return err, [c.step for c in ckpt.list()]


def test_a_failure_on_one_rank_raises_on_every_rank_and_commits_nothing(root):
    out = run_ranks(_fails_on_rank1, 2, root, timeout=90)
    assert out == [(([1], True), [2]), (([1], True), [2])]


def _restore_only(rank, world, root, verify):
    t = torch.zeros(64)
    with Checkpointer(root, {"t": t}) as ckpt:
        info = ckpt.restore(verify=verify)
    return info.step, t[0].item()


def _save_two(rank, world, root):
    t = torch.zeros(64)
    with Checkpointer(root, {"t": t}, write_threads=1) as ckpt:
        for step in (1, 2):
            t.fill_(step)
            ckpt.save(step)


def test_ranks_fall_back_together_when_one_rank_finds_damage(root, caplog):
    run_ranks(_save_two, 2, root)
    stepdir = os.path.join(root, "step_000000000002")
    names = sorted(json.load(open(os.path.join(stepdir, "manifest.json")))["files"])
    victim = names[1]  # checked by rank 1 only (files are shared out between ranks)
    with open(os.path.join(stepdir, victim), "r+b") as f:
        f.seek(0)
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    assert run_ranks(_restore_only, 2, root, True) == [(1, 1.0), (1, 1.0)]


def _async_with_training_collectives(rank, world, root):
    model, optim, sched = make_training(seed=3)
    ddp = DDP(model)
    ckpt = Checkpointer(root, {"model": ddp, "optim": optim}, async_save=True)
    snapshots = {}
    for step in range(1, 7):
        train(ddp, optim, sched, 1, seed=step)
        if step % 2 == 0:
            ckpt.save(step)
            snapshots[step] = clone_state(model.state_dict())
            with torch.no_grad():  # mutate right after save(): the checkpoint must not see it
                for p in model.parameters():
                    p.add_(1000.0)
            t = torch.ones(1)
            dist.all_reduce(t)  # training-thread collectives while the save runs
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(1000.0)
    ckpt.close()
    check = make_training(seed=9)[0]
    with Checkpointer(root, {"model": check}) as reader:
        ok = []
        for s in (2, 4, 6):
            assert reader.restore(step=s).step == s
            ok.append(tensors_equal(check.state_dict(), snapshots[s]))
    return ok, sorted(t.name for t in threading.enumerate() if t.name.startswith("distckpt"))


def test_async_saves_overlap_training_collectives_and_snapshot_at_call(root):
    out = run_ranks(_async_with_training_collectives, 2, root, timeout=120)
    assert [ok for ok, _ in out] == [[True] * 3, [True] * 3]
    assert [threads for _, threads in out] == [[], []]  # close() leaves no distckpt thread behind


def _save_restore(rank, world, root):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ckpt = distckpt.Checkpointer(root, {"model": model, "n": rank})
    ckpt.save(1)
    with torch.no_grad():
        model.weight.add_(1)
    ckpt.restore()
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    return torch.equal(model.weight, ref.weight), sorted(os.listdir(os.path.join(root, "step_000000000001")))


def test_two_ranks_save_and_restore_a_plain_module(root):
    out = run_ranks(_save_restore, 2, root)
    assert all(ok for ok, _ in out)
    assert "manifest.json" in out[0][1]
