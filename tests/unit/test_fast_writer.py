"""The writer that frames items itself (``distckpt/dcp/writer.py``) and the plan cache
(``distckpt/dcp/plan_cache.py``): what they write is a plain DCP checkpoint, bit-exact,
repeated saves skip DCP's planning, and any change of the tensors re-plans."""

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import distckpt
from distckpt.dcp import write_items
from distckpt.dcp.plan_cache import PlanCache
from distckpt.dcp.writer import _data_span, frame
from distckpt.layout.manifest import checksum_stream
from distckpt.storage import open_storage


def _state():
    base = torch.arange(40.0).reshape(8, 5)
    return {
        "slice": base[:, :2],  # a view into a bigger storage
        "transposed": base.t(),  # non-contiguous, owning all of its storage
        "bf16": torch.linspace(0, 1, 7, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.0),
        "empty": torch.empty(0, 4),
        "ints": torch.arange(1000, dtype=torch.int64),
    }


def test_framed_items_are_what_torch_save_writes(tmp_path):
    t = torch.randn(3, 5)
    head, tail = frame(t.dtype, tuple(t.shape))
    path = tmp_path / "x.pt"
    path.write_bytes(head + t.numpy().tobytes() + tail)
    assert torch.equal(torch.load(path, weights_only=True), t)


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.float32, (3, 5)),
        (torch.bfloat16, (7,)),
        (torch.int64, ()),
        (torch.float32, (0, 4)),
        (torch.float16, (4096, 4096)),
    ],  # fmt: skip
)
def test_frames_are_torch_saves_skip_data_output_and_load(dtype, shape, tmp_path):
    """frame() never holds the data; its bytes are what torch.save writes around the data
    under skip_data (as steps written before were framed), and the result loads."""
    t = (torch.rand(shape) * 100).to(dtype)
    buf = io.BytesIO()
    with torch.serialization.skip_data():
        torch.save(torch.empty(shape, dtype=dtype), buf)  # BytesIO: the hole is filled with zeros
    raw = buf.getvalue()
    start, nbytes = _data_span(raw)
    assert frame(dtype, shape) == (raw[:start], raw[start + nbytes :])
    head, tail = frame(dtype, shape)
    path = tmp_path / "x.pt"
    path.write_bytes(head + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() + tail)
    assert torch.equal(torch.load(path, weights_only=True), t)


def test_written_steps_load_with_plain_dcp_and_checksums_match(tmp_path):
    storage, state = open_storage(str(tmp_path)), _state()
    workdir = str(tmp_path / "step")
    storage.makedirs(workdir)
    records, catalog = write_items(state, storage, workdir, rank=0, group=None, threads=3)
    table = catalog["tensors"]
    assert set(table) == set(state) and table["bf16"] == {"shape": [7], "dtype": "bfloat16"}
    for rec in records:
        with open(os.path.join(workdir, rec.name), "rb") as f:
            assert checksum_stream(f) == (rec.size, rec.checksum)
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(back, checkpoint_id=workdir)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_repeated_saves_skip_dcp_planning_and_stay_plain_dcp(tmp_path):
    storage, cache = open_storage(str(tmp_path)), PlanCache()
    state = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(50)}
    metadata = []
    for step in range(3):
        workdir = str(tmp_path / f"s{step}")
        storage.makedirs(workdir)
        for t in state.values():
            t.add_(1)
        write_items(state, storage, workdir, rank=0, group=None, threads=2, cache=cache)
        metadata.append(open(os.path.join(workdir, ".metadata"), "rb").read())
        back = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(back, checkpoint_id=workdir)
        assert all(torch.equal(back[k], state[k]) for k in state)
    assert cache.hits == 2 and metadata[0] == metadata[1] == metadata[2]
    state["t0"] = torch.zeros(5)  # a new shape: planned again by DCP, then cached again
    workdir = str(tmp_path / "s3")
    storage.makedirs(workdir)
    write_items(state, storage, workdir, rank=0, group=None, threads=2, cache=cache)
    assert cache.hits == 2
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(back, checkpoint_id=workdir)
    assert torch.equal(back["t0"], torch.zeros(5))


def test_a_checkpointer_with_many_small_tensors_restores_bit_exact_after_cached_saves(root):
    state = {f"w{i}": torch.randn(16) for i in range(2000)}
    with distckpt.Checkpointer(root, {"s": state}, async_save=True) as ckpt:
        for step in range(1, 4):
            for t in state.values():
                t.mul_(2)
            ckpt.save(step)
        ckpt.wait()
        assert ckpt._parts.engine.plans.hits == 2  # steps 2 and 3 reused step 1's plan
    expect = {k: v.clone() for k, v in state.items()}
    for t in state.values():
        t.zero_()
    with distckpt.Checkpointer(root, {"s": state}, read_only=True) as ckpt:
        assert ckpt.restore().step == 3
    assert all(torch.equal(state[k], expect[k]) for k in state)
    assert distckpt.open(root).verify().ok


def test_background_saves_of_the_same_views_skip_per_tensor_work_and_stay_exact(root):
    """The staging views are the same objects save after save: the signature, placement and
    writer program are remembered (``plan_cache.Seen``). Every step still holds its own
    values, also after the state grows."""
    state = {f"w{i}": torch.randn(8 + i % 5) for i in range(3000)}
    expect = {}
    with distckpt.Checkpointer(root, {"s": state}, async_save=True, keep=distckpt.Keep(last=6)) as ckpt:
        plans = ckpt._parts.engine.plans
        for step in range(1, 7):
            for t in state.values():
                t.add_(1)
            if step == 5:  # the optimizer's first step: a new tensor, a new layout
                state["late"] = torch.arange(10.0)
            ckpt.save(step).wait()
            expect[step] = {k: v.clone() for k, v in state.items()}
        assert plans.recalled == 4  # steps 2, 3, 4 (views of step 1's) and 6 (of step 5's: a new layout)
        assert plans.seen is not None and plans.seen.placement.program is not None
    for step, values in expect.items():
        back = {k: torch.zeros_like(v) for k, v in values.items()}
        with distckpt.Checkpointer(root, {"s": back}, read_only=True) as ckpt:
            assert ckpt.restore(step=step).step == step
        assert all(torch.equal(back[k], values[k]) for k in values), step
    assert distckpt.open(root).verify().ok


def test_saves_taking_turns_between_two_arenas_remember_each_arenas_views(root):
    """``max_in_flight=2``: a save starts while the one before is written, so the two take
    turns between two arenas. Each arena's views are remembered on their own (one ``Seen``
    per arena): only the first save into each arena derives anything."""
    state = {f"w{i}": torch.randn(8 + i % 5) for i in range(3000)}
    expect = {}
    with distckpt.Checkpointer(
        root, {"s": state}, async_save=True, max_in_flight=2, keep=distckpt.Keep(last=6)
    ) as ckpt:
        plans = ckpt._parts.engine.plans
        for step in range(1, 7):
            for t in state.values():
                t.add_(1)
            ckpt.save(step)
            expect[step] = {k: v.clone() for k, v in state.items()}
        ckpt.wait()
        arenas = len(ckpt._parts.saves.stager.host._free)
        assert arenas == 2  # the saves did overlap
        assert plans.recalled == 6 - arenas
    for step, values in expect.items():
        back = {k: torch.zeros_like(v) for k, v in values.items()}
        with distckpt.Checkpointer(root, {"s": back}, read_only=True) as ckpt:
            assert ckpt.restore(step=step).step == step
        assert all(torch.equal(back[k], values[k]) for k in values), step


def test_live_tensors_are_looked_at_afresh_every_save(root):
    """A synchronous save writes the caller's own tensors, whose storage may change between
    saves (``p.data = ...``): nothing derived from them is remembered."""
    state = {f"w{i}": torch.randn(300_000 + i) for i in range(4)}  # big: placed by address
    with distckpt.Checkpointer(root, {"s": state}, async_save=False, keep=distckpt.Keep(last=3)) as ckpt:
        ckpt.save(1)
        state["w0"].data = torch.randn(300_001)[1:].clone()  # new storage, another address
        ckpt.save(2)
        plans = ckpt._parts.engine.plans
        assert plans.seen is None and plans.recalled == 0
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    with distckpt.Checkpointer(root, {"s": back}, read_only=True) as ckpt:
        assert ckpt.restore().step == 2
    assert all(torch.equal(back[k], state[k]) for k in state)
