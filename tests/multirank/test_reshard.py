"""Resharding: FSDP2 / DTensor state saved by N ranks restores with M ranks (and from plain DCP)."""

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from distckpt import Checkpointer
from distckpt.dcp import load_dcp_metadata
from distckpt.dcp.index import from_json
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train

WIDTH = 20  # not divisible by 3: uneven shards


def _fsdp(model):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _full_state(model, optim):
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return clone_state(get_model_state_dict(model, options=opts)), clone_state(
        get_optimizer_state_dict(model, optim, options=opts)
    )


def _fsdp_save(rank, world, root, mode):
    model, optim, sched = make_training(seed=0, width=WIDTH)
    _fsdp(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Checkpointer(root, {"model": model, "optim": optim}, mode=mode) as ckpt:
        for step in (1, 2, 3):  # saves 2 and 3 reuse save 1's plan: the restores below prove them
            train(model, optim, sched, 1, seed=rank * 10 + step)
            ckpt.save(step)
        engine = ckpt._parts.engine
        assert engine.plans.hits == (2 if engine.writes(ckpt._parts.ranks) else 0)  # chief mode: rank 0 writes
    return _full_state(model, optim)


def _fsdp_restore(rank, world, root, mode):
    model, _, _ = make_training(seed=42, width=WIDTH)
    if world > 1:
        _fsdp(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Checkpointer(root, {"model": model, "optim": optim}, mode=mode) as ckpt:
        assert ckpt.restore().step == 3
    if world > 1:
        return _full_state(model, optim)
    return clone_state(model.state_dict()), None


def _check(saved, restored):
    model_sd, optim_sd = saved[0]
    for m, o in restored:
        assert tensors_equal(m, model_sd)
        if o is not None:
            assert tensors_equal(o["state"], optim_sd["state"])


def test_fsdp2_sharded_2_ranks_restores_on_3_ranks_and_on_1_without_process_group(tmp_path):
    root = str(tmp_path / "ckpt")
    saved = run_ranks(_fsdp_save, 2, root, "sharded")
    # the restores read DCP's metadata from state.json's JSON index: it is the pickle's equal
    step = os.path.join(root, sorted(n for n in os.listdir(root) if n.startswith("step_"))[-1])
    with open(os.path.join(step, ".metadata"), "rb") as f:
        pickled = load_dcp_metadata(f, step)
    with open(os.path.join(step, "state.json")) as f:
        index = from_json(json.load(f)["dcp_metadata"], step)
    assert index.state_dict_metadata == pickled.state_dict_metadata and index.storage_data == pickled.storage_data
    assert any(len(md.chunks) == 2 for md in index.state_dict_metadata.values())  # sharded over the 2 ranks
    _check(saved, run_ranks(_fsdp_restore, 3, root, "sharded"))
    _check(saved, run_ranks(_fsdp_restore, 1, root, "sharded", init=False))


def test_fsdp2_chief_mode_gathers_full_state_and_restores_sharded(tmp_path):
    root = str(tmp_path / "ckpt")
    saved = run_ranks(_fsdp_save, 2, root, "chief")
    _check(saved, run_ranks(_fsdp_restore, 2, root, "chief"))
    # a chief (full) checkpoint also loads into a sharded job with another world size
    _check(saved, run_ranks(_fsdp_restore, 3, root, "sharded"))


class _Holder:
    def __init__(self, tensors):
        self.tensors = tensors

    def state_dict(self):
        return dict(self.tensors)

    def load_state_dict(self, state):
        for k, v in state.items():
            self.tensors[k] = v


def _dtensor_job(rank, world, root, save):
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(7)
    full = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g), "c": torch.arange(11.0)}
    if save:
        holder = _Holder({k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()})
    else:
        holder = _Holder({k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in full.items()})
    with Checkpointer(root, {"h": holder}) as ckpt:
        if save:
            ckpt.save(1)
        else:
            ckpt.restore()
    got = {k: v.full_tensor() for k, v in holder.tensors.items()}
    return all(torch.equal(got[k], full[k]) for k in full)


def test_dtensor_shards_2_to_3_ranks_with_uneven_splits(root):
    assert run_ranks(_dtensor_job, 2, root, True) == [True, True]
    assert run_ranks(_dtensor_job, 3, root, False) == [True, True, True]


def _plain_dcp_load(rank, world, stepdir):
    model, _, _ = make_training(seed=42, width=WIDTH)
    _fsdp(model)
    target = {"model": get_model_state_dict(model)}
    dcp.load(target, checkpoint_id=stepdir)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    dist.barrier()
    return clone_state(full) if rank == 0 else None


def test_a_committed_step_is_readable_by_plain_dcp_load(tmp_path):
    root = str(tmp_path / "ckpt")
    saved = run_ranks(_fsdp_save, 2, root, "sharded")
    out = run_ranks(_plain_dcp_load, 2, f"{root}/step_000000000003")
    assert tensors_equal(out[0], saved[0][0])
