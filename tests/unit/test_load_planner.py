"""What makes a restore of many small tensors cheap, checked against DCP's own results.

The load planner's shortcut for plain tensors stored whole (``distckpt/dcp/safe.py``): the
plan it makes is the plan DCP's default planner makes, item for item; what it cannot plan
in one step (a resharded tensor, a partial load) goes to DCP's rules, mismatches included;
and the restore that uses it reads through DCP's own machinery bit-exact. DCP's metadata as
JSON (``distckpt/dcp/index.py``): it turns back into equal ``Metadata``."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex

from distckpt import CorruptCheckpointError
from distckpt.dcp.index import from_json, to_json
from distckpt.dcp.safe import SafeLoadPlanner, _whole_chunk


def _saved(tmp_path, state):
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    return FileSystemReader(str(tmp_path)).read_metadata()


def _plan(planner, state, md):
    planner.set_up_planner(state, md, True)
    return planner.create_local_plan().items


STATE = {
    "w": torch.randn(4, 3),
    "bf16": torch.randn(7).to(torch.bfloat16),
    "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 5),
    "ints": torch.arange(10),
}


def test_the_shortcut_plans_exactly_what_dcps_planner_plans(tmp_path):
    md = _saved(tmp_path, STATE)
    target = {k: torch.zeros_like(v) for k, v in STATE.items()}
    ours, theirs = _plan(SafeLoadPlanner(), target, md), _plan(DefaultLoadPlanner(), target, md)
    assert ours == theirs
    # MetadataIndex.index takes no part in ==; DCP's reader uses it as a hint, so it must match too
    assert [(r.storage_index.index, r.dest_index.index) for r in ours] == [
        (r.storage_index.index, r.dest_index.index) for r in theirs
    ]
    assert all((_whole_chunk(md.state_dict_metadata[k], v) is None) == (k == "empty") for k, v in target.items())


def test_a_tensor_stored_in_chunks_is_planned_by_dcp(tmp_path):
    md = _saved(tmp_path, STATE)
    # as if saved by 2 ranks, each with half of the rows: DCP's sweep has to cut the reads
    tsm = md.state_dict_metadata["w"]
    half = type(tsm.chunks[0])
    tsm.chunks = [half(torch.Size([0, 0]), torch.Size([2, 3])), half(torch.Size([2, 0]), torch.Size([2, 3]))]
    target = {k: torch.zeros_like(v) for k, v in STATE.items()}
    assert _whole_chunk(tsm, target["w"]) is None
    ours = _plan(SafeLoadPlanner(), target, md)
    assert ours == _plan(DefaultLoadPlanner(), target, md)
    assert sum(r.dest_index.fqn == "w" for r in ours) == 2


def test_a_partial_load_and_a_size_mismatch_follow_dcps_rules(tmp_path):
    md = _saved(tmp_path, STATE)
    subset = {"w": torch.zeros(4, 3)}
    assert _plan(SafeLoadPlanner(), subset, md) == _plan(DefaultLoadPlanner(), subset, md)
    wrong = {k: torch.zeros_like(v) for k, v in STATE.items()} | {"w": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match="Size mismatch"):
        _plan(SafeLoadPlanner(), wrong, md)


def test_resolve_returns_the_destination_tensor_itself(tmp_path):
    md = _saved(tmp_path, STATE)
    target = {k: torch.zeros_like(v) for k, v in STATE.items()}
    planner = SafeLoadPlanner()
    for req in _plan(planner, target, md):
        out = planner.resolve_tensor(req)
        assert out is target[req.dest_index.fqn]


def test_dcp_load_with_the_planner_is_bit_exact(tmp_path):
    _saved(tmp_path, STATE)
    target = {k: torch.zeros_like(v) for k, v in STATE.items()}
    dcp.load(target, checkpoint_id=str(tmp_path), planner=SafeLoadPlanner(), no_dist=True)
    for k, v in STATE.items():
        assert torch.equal(target[k], v), k


# --- DCP's metadata as JSON (distckpt/dcp/index.py) ---------------------------------------


def _same(a, b):
    """Metadata equality, index hints included (MetadataIndex.index takes no part in ==)."""
    assert a.state_dict_metadata == b.state_dict_metadata
    assert a.planner_data == b.planner_data and a.version == b.version
    assert list(a.storage_data.items()) == list(b.storage_data.items())
    assert [k.index for k in a.storage_data] == [k.index for k in b.storage_data]


def test_the_json_index_gives_back_equal_metadata(tmp_path):
    state = dict(STATE, grad=torch.nn.Parameter(torch.randn(3, 2)), cl=torch.randn(2, 3, 4, 5))
    md = _saved(tmp_path, state)
    data = json.loads(json.dumps(to_json(md)))  # as state.json holds it
    _same(from_json(data, "x"), md)
    # resharded layouts: a tensor stored as several chunks, in two files
    tsm = md.state_dict_metadata["w"]
    chunk, first = type(tsm.chunks[0]), next(k for k in md.storage_data if k.fqn == "w")
    tsm.chunks = [chunk(torch.Size([0, 0]), torch.Size([2, 3])), chunk(torch.Size([2, 0]), torch.Size([2, 3]))]
    info = md.storage_data.pop(first)
    md.storage_data[MetadataIndex("w", torch.Size([0, 0]), 0)] = info
    md.storage_data[MetadataIndex("w", torch.Size([2, 0]), 1)] = type(info)("__1_0.distcp", 64, info.length // 2)
    _same(from_json(json.loads(json.dumps(to_json(md))), "x"), md)


def test_what_the_json_index_cannot_express_keeps_the_pickle(tmp_path):
    md = _saved(tmp_path, {"t": torch.zeros(2), "extra": {"nested": 1}})  # a pickled (bytes) item
    assert to_json(md) is None


def test_a_damaged_json_index_is_a_clear_error():
    with pytest.raises(CorruptCheckpointError, match="tensor index in state.json is unreadable"):
        from_json({"format": 1, "tensors": [["w", 0]]}, "step_000000000002")
    with pytest.raises(CorruptCheckpointError, match="this distckpt reads 1"):
        from_json({"format": 99}, "step_000000000002")
