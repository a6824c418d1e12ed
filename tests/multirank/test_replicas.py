"""Peer replicas of node memory (``replicas.py``): real gloo ranks as simulated nodes, each
node with its own ``local_dir``; a wiped node gets its copy back from its partner."""

import json
import os
import random
import shutil
import signal
import time
from datetime import timedelta

import pytest
import torch

from distckpt import Checkpointer, Keep
from distckpt.replicas import plan_repairs
from tests.support.harness import _context, run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train

STEPS = 3


def _kwargs(rank, per_node, mem, **extra):
    return {"local_dir": os.path.join(mem, f"node{rank // per_node}"), "local_keep": 2, **extra}


def _save(rank, world, root, mem, per_node, mode):
    model, optim, sched = make_training(seed=0)
    ckpt = Checkpointer(root, {"model": model, "optim": optim}, mode=mode, async_save=True,
                        **_kwargs(rank, per_node, mem))  # fmt: skip
    for step in range(1, STEPS + 1):
        train(model, optim, sched, 1, seed=step)
        ckpt.save(step)
    ckpt.close()
    return clone_state(model.state_dict())


def _restore(rank, world, root, mem, per_node, mode):
    model, optim, _ = make_training(seed=7)
    with Checkpointer(root, {"model": model, "optim": optim}, mode=mode, **_kwargs(rank, per_node, mem)) as ckpt:
        info = ckpt.restore()
        return info.step, info.tier, clone_state(model.state_dict())


def _setup(tmp_path, world, per_node, mode):
    root, mem = str(tmp_path / "remote"), str(tmp_path / "mem")
    saved = run_ranks(_save, world, root, mem, per_node, mode)
    return root, mem, saved


def _replica_dirs(mem, node):
    base = os.path.join(mem, f"node{node}", "replicas")
    return sorted(os.listdir(base)) if os.path.isdir(base) else []


def _held(mem, node, owner=None):
    """The steps committed in a node's memory: its own copies, or its replicas of ``owner``'s."""
    base = os.path.join(mem, f"node{node}", *(("replicas", f"node-{owner}") if owner is not None else ()))
    names = os.listdir(base) if os.path.isdir(base) else []
    return sorted(
        int(n[5:]) for n in names if n.startswith("step_") and os.path.isfile(os.path.join(base, n, "manifest.json"))
    )


@pytest.mark.parametrize("mode, wiped", [("sharded", 1), ("chief", 1), ("sharded", 0)])
def test_a_wiped_node_resumes_from_its_partners_replica_reading_nothing_remote(tmp_path, mode, wiped):
    root, mem, saved = _setup(tmp_path, 4, 2, mode)  # 4 ranks as 2 nodes
    assert _replica_dirs(mem, 0) == ["node-1"] and _replica_dirs(mem, 1) == ["node-0"]
    with open(os.path.join(mem, "node0", f"step_{STEPS:012d}", "manifest.json")) as f:
        placement = json.load(f)["placement"]  # the manifest says where every copy lives
    assert placement == {"node_of_rank": [0, 0, 1, 1], "replicas_of_node": {"0": [1], "1": [0]}}
    before = {(n, o): _held(mem, n, o) for n, o in [(0, None), (1, None), (0, 1), (1, 0)]}
    assert all(steps == [STEPS - 1, STEPS] for steps in before.values())
    shutil.rmtree(os.path.join(mem, f"node{wiped}"))  # replaced: its memory is empty (the chief's node, too)
    shutil.rmtree(root)
    os.makedirs(root)  # nothing on the remote tier: a restore that needed it would start fresh
    out = run_ranks(_restore, 4, root, mem, 2, mode)
    for rank, (step, tier, state) in enumerate(out):
        assert (step, tier) == (STEPS, "local+replica"), rank
        assert tensors_equal(state, saved[rank])
    # after the restore, in the background: the wiped node's own copies and its replicas of
    # its partner are back - protected again without waiting for a save
    after = {(n, o): _held(mem, n, o) for n, o in [(0, None), (1, None), (0, 1), (1, 0)]}
    assert after == before


def test_losing_a_node_and_its_partner_falls_back_to_the_newest_remote_step(tmp_path):
    root, mem, saved = _setup(tmp_path, 4, 1, "sharded")  # 4 nodes of one rank: node 1's replica is on node 2
    shutil.rmtree(os.path.join(mem, "node1"))
    shutil.rmtree(os.path.join(mem, "node2"))
    out = run_ranks(_restore, 4, root, mem, 1, "sharded")
    for rank, (step, tier, state) in enumerate(out):
        assert (step, tier) == (STEPS, "primary"), rank
        assert tensors_equal(state, saved[rank])


def test_only_the_wiped_node_is_refilled_when_other_nodes_still_hold_their_copies(tmp_path):
    root, mem, saved = _setup(tmp_path, 4, 1, "sharded")
    shutil.rmtree(os.path.join(mem, "node3"))  # node 3's copy lives on node 0
    held = {n: (_held(mem, n), _held(mem, n, (n - 1) % 4)) for n in range(3)}
    interrupted = os.path.join(mem, "node0", "replicas", "node-3", ".tmp-step_000000000099-replica-3")
    os.makedirs(interrupted)  # a receive killed mid-way: its memory is given back
    open(os.path.join(interrupted, "__3_0.distcp"), "wb").write(b"x" * 1000)
    out = run_ranks(_restore, 4, root, mem, 1, "sharded")
    assert [(s, t) for s, t, _ in out] == [(STEPS, "local+replica")] * 4
    assert all(tensors_equal(state, saved[r]) for r, (_, _, state) in enumerate(out))
    assert {n: (_held(mem, n), _held(mem, n, (n - 1) % 4)) for n in range(3)} == held  # untouched
    assert _held(mem, 3) == _held(mem, 3, 2) == [STEPS - 1, STEPS]  # its copies and its replicas of node 2
    assert not os.path.exists(interrupted)


def test_a_memory_tier_step_saved_by_4_ranks_restores_on_2(tmp_path):
    root, mem, saved = _setup(tmp_path, 4, 2, "sharded")  # 4 ranks as 2 nodes
    shutil.rmtree(root)
    os.makedirs(root)  # memory only
    out = run_ranks(_restore, 2, root, mem, 1, "sharded")  # 2 ranks, one per node
    for step, tier, state in out:
        assert (step, tier) == (STEPS, "local")
        assert tensors_equal(state, saved[0])  # DDP: every rank held the same state


def test_a_damaged_replica_is_never_used():
    views = {
        0: {"node": 0, "own": [1, 2], "replicas": {"1": [1]}},
        1: {"node": 1, "own": [], "replicas": {"0": [1, 2]}},
    }
    plan, lost = plan_repairs(views, 2)
    assert [(t.step, t.owner, t.src, t.dst) for t in plan] == [(1, 1, 0, 1)]  # step 2: node 1 has no copy anywhere
    assert lost == {2: [1]}


def test_replica_retention_keeps_the_newest_local_keep_steps(tmp_path):
    root, mem, _ = _setup(tmp_path, 2, 1, "sharded")
    kept = sorted(os.listdir(os.path.join(mem, "node0", "replicas", "node-1")))
    assert [n for n in kept if n.startswith("step_")] == ["step_000000000002", "step_000000000003"]


# --- kill -9 at random instants, with replication in flight ----------------------------------


def _expected(step):
    g = torch.Generator().manual_seed(step)
    return {"a": torch.randn(256, 1024, generator=g), "b": torch.randn(4096, generator=g)}


def _killable_job(rank, world, store, root, mem, conn):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    state = {k: torch.zeros_like(v) for k, v in _expected(0).items()}
    ckpt = Checkpointer(root, {"s": state}, local_dir=os.path.join(mem, f"node{rank}"), local_keep=2,
                        keep=Keep(last=2))  # fmt: skip
    info = ckpt.restore()
    start = info.step if info else 0
    ok = info is None or all(torch.equal(state[k], v) for k, v in _expected(start).items())
    conn.send(("resumed", start, ok, info.tier if info else None))
    for step in range(start + 1, start + 100_000):
        for k, v in _expected(step).items():
            state[k].copy_(v)
        ckpt.save(step)  # returns once committed on both nodes and protected by the partner's replica
        conn.send(("saved", step, True, None))


@pytest.mark.timeout(400)
def test_kill_9_mid_replication_then_a_wiped_node_never_loses_a_protected_save(tmp_path):
    ctx = _context()
    root, mem = str(tmp_path / "remote"), str(tmp_path / "mem")
    rng = random.Random(3)
    newest_protected, resumed_from_replica = 0, 0
    for trial in range(8):
        store = str(tmp_path / f"store{trial}")
        pipes = [ctx.Pipe() for _ in range(2)]
        procs = [ctx.Process(target=_killable_job, args=(r, 2, store, root, mem, pipes[r][1]), daemon=True)
                 for r in range(2)]  # fmt: skip
        for p in procs:
            p.start()
        for parent, _ in pipes:
            assert parent.poll(120), "a rank did not start"
            kind, start, ok, tier = parent.recv()
            assert kind == "resumed" and ok, f"trial {trial}: resumed at {start} with a different state"
            assert start >= newest_protected, f"trial {trial}: step {newest_protected} returned but resumed at {start}"
            resumed_from_replica += tier == "local+replica"
        time.sleep(rng.uniform(0.2, 1.2))  # somewhere in a save: writing, committing, replicating
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join()
        for parent, _ in pipes:
            while parent.poll():
                newest_protected = max(newest_protected, parent.recv()[1])
        if trial % 2 == 0:  # node 1 is replaced: its memory is empty at the restart
            shutil.rmtree(os.path.join(mem, "node1"), ignore_errors=True)
    assert newest_protected > 0 and resumed_from_replica >= 1
    for node in ("node0", "node1"):  # a replica is whole or absent: never a half-written step
        base = os.path.join(mem, node, "replicas")
        for owner in os.listdir(base) if os.path.isdir(base) else []:
            for name in os.listdir(os.path.join(base, owner)):
                assert not name.startswith("step_") or os.path.isfile(os.path.join(base, owner, name, "manifest.json"))


def _save_every_third_remote(rank, world, root, mem):
    t = torch.zeros(1000)
    with Checkpointer(root, {"t": t}, local_dir=os.path.join(mem, f"node{rank}"), upload_every=3) as ckpt:
        for step in range(1, 6):
            t.fill_(step)
            ckpt.save(step)
        ckpt.wait()  # uploads done: only what was sent is there
        before_close = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
    return before_close


def test_every_kth_save_goes_remote_and_close_sends_the_newest(tmp_path):
    root, mem = str(tmp_path / "remote"), str(tmp_path / "mem")
    before_close = run_ranks(_save_every_third_remote, 2, root, mem)
    assert before_close[0] == [3]  # saves 1, 2, 4, 5 stayed in node memory (and on the partner)
    remote = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
    assert remote == [3, 5]  # close() uploaded the newest one


def _save_on_an_interval(rank, world, root, mem):
    t = torch.zeros(1000)
    went = []
    with Checkpointer(root, {"t": t}, local_dir=os.path.join(mem, f"node{rank}"),
                      upload_every=timedelta(seconds=6)) as ckpt:  # fmt: skip
        for step in range(1, 5):
            if step == 3:
                time.sleep(6.2)  # the interval has passed: step 3 goes remote
            t.fill_(step)
            ckpt.save(step)
            ckpt.wait()
            went.append(sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_")))
    return went


def test_saves_go_remote_on_a_time_interval(tmp_path):
    root, mem = str(tmp_path / "remote"), str(tmp_path / "mem")
    went = run_ranks(_save_on_an_interval, 2, root, mem)
    assert went[0] == [[1], [1], [1, 3], [1, 3]]  # the first save, then one once 6 s have passed
    assert sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_")) == [1, 3, 4]  # + close()
    with pytest.raises(ValueError, match="positive timedelta"):
        Checkpointer(root, {"t": torch.zeros(1)}, local_dir=str(tmp_path / "m"), upload_every=timedelta(0))


def _restore_read_only(rank, world, root, mem, per_node):
    model, optim, _ = make_training(seed=7)
    with Checkpointer(root, {"model": model, "optim": optim}, read_only=True, **_kwargs(rank, per_node, mem)) as ckpt:
        info = ckpt.restore()
        return info.step, clone_state(model.state_dict())


def test_a_read_only_restore_reads_partners_replicas_and_writes_no_node_memory(tmp_path):
    root, mem, saved = _setup(tmp_path, 4, 2, "sharded")
    shutil.rmtree(os.path.join(mem, "node1"))
    shutil.rmtree(root)
    os.makedirs(root)
    out = run_ranks(_restore_read_only, 4, root, mem, 2)
    for rank, (step, state) in enumerate(out):  # node 1's ranks received what node 0 holds
        assert step == STEPS and tensors_equal(state, saved[rank])
    assert not os.path.exists(os.path.join(mem, "node1"))  # nothing refilled, nothing made: read only
