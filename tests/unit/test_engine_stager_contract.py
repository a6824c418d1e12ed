"""The ``Engine`` and ``Stager`` contracts, in one process (their multi-rank side is in
``tests/multirank/test_ranks_contract.py``). A new engine or stager joins by adding a case
to its fixture.

Engine: what ``write`` returns describes the files on storage exactly (sizes and XXH3
checksums computed as written, never read back), the chief's table names every tensor's
global shape and dtype, the folder is plain DCP, and ``read`` fills tensors in place.
Stager: ``stage`` is a snapshot (the caller may change its tensors right away) unless it
says ``live``; ``release`` returns the memory, which the next save reuses.
"""

import itertools
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distckpt.engine import ENGINES, make_engine
from distckpt.layout.manifest import checksum_stream
from distckpt.ranks import RankContext
from distckpt.staging import DeviceSnapshotStager, DirectStager, PoolStager
from distckpt.storage import open_storage

STAGERS = {
    "host": lambda: PoolStager(pin=False),
    "pinned": lambda: PoolStager(pin=True),
    "gpu": lambda: DeviceSnapshotStager(),
    "direct": lambda: DirectStager(),
}
NEEDS_CUDA = {"pinned", "gpu"}


def _state(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(64, 32, generator=g).to(device),
        "model.b": torch.randn(32, generator=g).to(device, torch.bfloat16),
        "optim.step": torch.tensor(3.0).to(device),
        "optim.ids": torch.arange(10).to(device),
    }


@pytest.mark.parametrize("mode", sorted(ENGINES))
def test_engine_writes_what_it_reports_and_reads_it_back(mode, tmp_path):
    engine, ranks = make_engine(mode, write_threads=2), RankContext()
    storage = open_storage(str(tmp_path))
    workdir = storage.join(storage.root, "step")
    storage.makedirs(workdir)
    state = _state()
    assert engine.writes(ranks)  # a single rank is the chief, and writes in every mode
    records, catalog = engine.write(state, workdir, storage, ranks)
    assert {r.name for r in records} == set(os.listdir(workdir))
    for rec in records:
        with open(os.path.join(workdir, rec.name), "rb") as f:
            assert checksum_stream(f) == (rec.size, rec.checksum)
    assert catalog["tensors"] == {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()
    }
    # DCP's own reader and the raw fast path; DCP's metadata from .metadata or from the JSON index
    for contiguous, metadata in itertools.product((False, True), (None, catalog["dcp_metadata"])):
        back = {k: torch.zeros_like(v) for k, v in state.items()}
        engine.read(back, workdir, storage, ranks, contiguous, metadata=metadata)
        assert all(torch.equal(back[k], state[k]) for k in state)
    plain = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(plain, checkpoint_id=workdir)  # a plain DCP folder
    assert all(torch.equal(plain[k], state[k]) for k in state)


@pytest.fixture(params=sorted(STAGERS))
def stager_kind(request):
    if request.param in NEEDS_CUDA and not torch.cuda.is_available():
        pytest.skip("CUDA-only stager")
    return request.param


def test_stage_is_a_snapshot_and_memory_is_reused(stager_kind):
    device = "cuda" if stager_kind in NEEDS_CUDA else "cpu"
    stager, state = STAGERS[stager_kind](), _state(device)
    original = {k: v.clone() for k, v in state.items()}
    stager.reserve(sum(v.numel() * v.element_size() for v in state.values()))
    capacities = []
    for _ in range(3):
        staged = stager.stage(state)
        for v in state.values():
            v.add_(1)  # training goes on right after save() returns
        written = staged.materialize()
        expect = state if staged.live else original
        assert staged.live == (stager_kind == "direct")
        assert all(torch.equal(written[k].cpu(), expect[k].cpu()) for k in state)
        staged.release()
        capacities.append(stager.capacity)
        original = {k: v.clone() for k, v in state.items()}
    assert len(set(capacities)) == 1  # reserved once, reused by every save
    stager.close()


def test_a_deferred_copy_holds_the_state_as_it_was_at_stage(stager_kind):
    """``stage(tensors, later=names)`` (snapshot="overlap"): the copy of ``names`` may run
    after ``stage`` returns; once ``ready`` is done (the caller's next optimizer step waits
    for it) the tensors may change. On CUDA the deferred copy starts where the caller's
    stream was at ``stage``: work queued just before is in it."""
    device = "cuda" if stager_kind in NEEDS_CUDA else "cpu"
    stager, state = STAGERS[stager_kind](), _state(device)
    stager.reserve(sum(v.numel() * v.element_size() for v in state.values()))
    for v in state.values():
        v.add_(2)  # queued (on CUDA: asynchronously) right before the save
    original = {k: v.clone() for k, v in state.items()}
    staged = stager.stage(state, later={"model.w", "optim.step"})
    ready = getattr(staged, "ready", None)
    if ready is not None:
        ready.result(30)  # what the step pre-hook waits for
    for v in state.values():
        v.mul_(-1)  # the optimizer step
    written = staged.materialize()
    expect = state if staged.live else original
    assert all(torch.equal(written[k].cpu(), expect[k].cpu()) for k in state)
    assert (ready is not None) == (stager_kind in ("host", "pinned"))  # pools defer; the others copy at once
    staged.release()
    stager.close()


def test_a_save_right_after_reserve_takes_the_pool_over_without_waiting():
    """The reserve faults the pool in on a background thread; a save arriving first stops it
    at its next chunk and copies into the same arena (faulting the rest itself), instead
    of waiting for the whole reserve. The background must never write into staged data."""
    state = {f"t{i}": torch.randn(1 << 20) for i in range(64)}  # 256 MiB
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    stager = PoolStager(pin=False)
    stager.reserve(nbytes)
    (arena,) = stager.host._free
    staged = stager.stage(state)
    assert not stager._reserving.is_alive()  # stopped, not finished behind the save's back
    assert arena.faulted < arena.buf.numel()  # the save did not wait for the whole reserve
    assert stager.capacity == arena.nbytes  # same arena: the pool did not grow
    written = staged.materialize()
    assert all(torch.equal(written[k], state[k]) for k in state)
    staged.release()
    stager.close()
