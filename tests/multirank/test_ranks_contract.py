"""The rank-context (``Ranks``) contract on real gloo ranks, and the engines' multi-rank side.

``RankContext`` is checked with one rank and no process group at all, and with 3 ranks: a
new implementation (another backend, another launcher) joins by adding a case. Every
collective answers in rank order on every rank; ``agree`` turns one rank's error into the
same ``CheckpointError`` on all ranks, so no rank is left waiting in a collective.
"""

import pytest
import torch

from distckpt.engine import make_engine
from distckpt.errors import CheckpointError, RemoteError
from distckpt.ranks import RankContext
from distckpt.storage import open_storage
from tests.support.harness import run_ranks


def _collectives(rank, world):
    ranks = RankContext()
    out = {
        "who": (ranks.rank, ranks.world_size, ranks.is_chief),
        "gather": ranks.all_gather(rank * 10),
        "gather_bg": ranks.all_gather(f"r{rank}", on="bg"),
        "any_last": ranks.any_true(rank == world - 1),
        "any_none": ranks.any_true(False),
        "agree": ranks.agree(lambda: rank + 100, "adding"),
        "chief_only": ranks.agree(lambda: "chosen" if ranks.is_chief else None, "choosing")[0],
        "group_is_none": ranks.group("fg") is None,
    }
    ranks.barrier()
    try:
        ranks.agree(lambda: 1 / 0 if rank == world - 1 else rank, "failing on the last rank", on="bg")
    except CheckpointError as e:
        culprit = e.errors[world - 1]
        out["error"] = (str(e).startswith("failing on the last rank failed"), sorted(e.errors), type(culprit).__name__)
        out["remote"] = isinstance(culprit, RemoteError) == (rank != world - 1)
    ranks.barrier()  # everyone got here: nobody hangs after a failed agreement
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_rank_context_collectives_agree_on_every_rank(world):
    results = run_ranks(_collectives, world, init=world > 1, timeout=120)
    for rank, out in enumerate(results):
        assert out["who"] == (rank, world, rank == 0)
        assert out["gather"] == [r * 10 for r in range(world)]
        assert out["gather_bg"] == [f"r{r}" for r in range(world)]
        assert out["any_last"] is True and out["any_none"] is False
        assert out["agree"] == [r + 100 for r in range(world)]
        assert out["chief_only"] == "chosen"
        assert out["group_is_none"] == (world == 1)
        assert out["error"] == (True, [world - 1], "ZeroDivisionError" if rank == world - 1 else "RemoteError")
        assert out["remote"]


def _engine_job(rank, world, root, mode):
    ranks, engine = RankContext(), make_engine(mode)
    storage = open_storage(root)
    workdir = storage.join(storage.root, "step")
    storage.makedirs(workdir)
    state = {"shared.w": torch.arange(12.0).reshape(3, 4)}
    if mode == "sharded":  # every rank's own tensors, written by that rank (chief mode: one full state)
        state[f"rank{rank}.x"] = torch.full((2,), float(rank))
    records, catalog = engine.write(state, workdir, storage, ranks)
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    ranks.barrier()
    engine.read(back, workdir, storage, ranks, True)
    same = all(torch.equal(back[k], state[k]) for k in state)
    return engine.writes(ranks), sorted(r.name for r in records), sorted(catalog.get("tensors", {})), same


def test_sharded_engine_writes_on_every_rank_and_chief_engine_on_rank0(tmp_path):
    sharded = run_ranks(_engine_job, 2, str(tmp_path / "s"), "sharded")
    assert [w for w, *_ in sharded] == [True, True]
    assert all(files for _, files, _, _ in sharded) and all(same for *_, same in sharded)
    assert sharded[0][2] == ["rank0.x", "rank1.x", "shared.w"] and sharded[1][2] == []  # the table: chief only
    chief = run_ranks(_engine_job, 2, str(tmp_path / "c"), "chief")
    assert [w for w, *_ in chief] == [True, False]
    assert chief[0][1] and chief[1][1] == []  # rank 1 writes nothing
    assert chief[0][2] == ["shared.w"] and all(same for *_, same in chief)  # every rank reads it all


def _planned_saves(rank, world, root):
    ranks, engine = RankContext(), make_engine("sharded")
    storage = open_storage(root)
    state = {"shared.w": torch.arange(12.0).reshape(3, 4), f"rank{rank}.x": torch.full((2,), float(rank))}
    hits, exact = [], []
    for step in range(4):
        if step == 2 and rank == 1:
            state["rank1.x"] = torch.zeros(5)  # one rank's tensors change: every rank must re-plan
        for t in state.values():
            t.add_(1)
        workdir = storage.join(storage.root, f"s{step}")
        storage.makedirs(workdir)
        engine.write(state, workdir, storage, ranks)
        hits.append(engine.plans.hits)
        back = {k: torch.zeros_like(v) for k, v in state.items()}
        ranks.barrier()
        engine.read(back, workdir, storage, ranks, True)
        exact.append(all(torch.equal(back[k], state[k]) for k in state))
    return hits, exact


def test_repeated_sharded_saves_reuse_the_plan_only_when_every_rank_can(tmp_path):
    out = run_ranks(_planned_saves, 2, str(tmp_path))
    for hits, exact in out:
        assert hits == [0, 1, 1, 2]  # save 2 re-planned on both ranks although rank 0 changed nothing
        assert all(exact)
