"""Restores planned from ``state.json``'s index (``distckpt/dcp/direct.py``) and files read in
place with scatter reads (``distckpt/dcp/scatter.py``).

The index records where each item's data starts (``heads``); a restore of plain tensors stored
whole reads them from there without DCP's planner, bit-exact, casting where the job's dtype
differs; a step without ``heads`` (written before they were recorded) goes through DCP. The
scatter reads deliver every byte of a file to its destination, in order, whatever the batch
boundaries, with and without a file descriptor."""

import io
import json
import os
import random

import pytest
import torch

import distckpt.dcp as bridge
from distckpt import Checkpointer
from distckpt.dcp.scatter import SKIP, batches, fd_of, read_batch
from tests.support.faults import doctor


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(600_000, generator=g),  # over a MB: read in several pieces
        "bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "ints": torch.randint(0, 1 << 40, (100,), generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 5),
        "flags": torch.rand(17, generator=g) > 0.5,
    }


def _save(root, seed=1):
    with Checkpointer(root, {"state": _state(seed)}) as ckpt:
        ckpt.save(seed).wait()
    return os.path.join(root, f"step_{seed:012d}")


@pytest.fixture
def dcp_loads(monkeypatch):
    """How many loads went through DCP's planner (a spy: the real load still runs)."""
    calls = []
    real = bridge._dcp_load

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bridge, "_dcp_load", spy)
    return calls


def test_plain_tensors_are_read_from_the_index_without_dcps_planner(root, dcp_loads):
    _save(root)
    want = _state(1)
    target = {k: torch.zeros_like(v) for k, v in want.items()}
    target["big"] = torch.zeros(600_000, dtype=torch.float64)  # another dtype: read, then cast
    target["bf16"] = torch.zeros(7, 33, dtype=torch.bfloat16).t()  # strided: read, then copied in
    with Checkpointer(root, {"state": target}) as ckpt:
        assert ckpt.restore().step == 1
    assert not dcp_loads
    assert torch.equal(target["big"], want["big"].double())
    for k in want:
        if k != "big":
            assert target[k].dtype == want[k].dtype and torch.equal(target[k], want[k]), k


def test_a_step_without_frame_lengths_is_planned_by_dcp(root, dcp_loads):
    stepdir = _save(root)
    with open(os.path.join(stepdir, "state.json")) as f:
        state = json.load(f)
    del state["dcp_metadata"]["heads"]  # as steps written before they were recorded
    doctor(stepdir, "state.json", json.dumps(state).encode())
    target = {k: torch.zeros_like(v) for k, v in _state(1).items()}
    with Checkpointer(root, {"state": target}) as ckpt:
        ckpt.restore()
    assert dcp_loads == [1]
    assert all(torch.equal(target[k], v) for k, v in _state(1).items())


def test_frame_lengths_point_at_each_tensors_bytes(root):
    stepdir = _save(root)
    with open(os.path.join(stepdir, "state.json")) as f:
        index = json.load(f)["dcp_metadata"]
    want = {f"state.{k}": v for k, v in _state(1).items()}
    dtypes = {k: v.dtype for k, v in want.items()}
    assert len(index["heads"]) == len(index["storage"])
    for (t, _, _, f, offset, length), head in zip(index["storage"], index["heads"], strict=True):
        fqn = index["tensors"][t][0]
        nbytes = want[fqn].numel() * dtypes[fqn].itemsize
        assert head + nbytes < length
        with open(os.path.join(stepdir, index["files"][f]), "rb") as fh:
            fh.seek(offset + head)
            data = bytearray(fh.read(nbytes))
        got = torch.frombuffer(data, dtype=dtypes[fqn]) if nbytes else torch.empty(0, dtype=dtypes[fqn])
        assert torch.equal(got.view(want[fqn].shape), want[fqn]), fqn


# --- scatter reads -------------------------------------------------------------------------


def _layout(size, rng):
    """Spans over a file of ``size`` bytes: destinations and gaps (short ones, and long ones
    that an unchecksummed read skips), in order."""
    spans, pos = [], 0
    while pos < size:
        n = min(size - pos, rng.choice([1, 7, 100, 4096, SKIP + 5, 300_000]))
        spans.append((pos, n, None if rng.random() < 0.3 else memoryview(bytearray(n))))
        pos += n
    return spans


class _Stream(io.RawIOBase):
    """A stream without a descriptor that returns at most 1,000 bytes a call (as object
    stores' files may)."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def readinto(self, view):
        n = min(len(view), 1000, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, pos, whence=0):
        self.pos = pos
        return pos

    def tell(self):
        return self.pos


@pytest.mark.parametrize("whole", [True, False], ids=["checksummed", "unchecksummed"])
@pytest.mark.parametrize("piece", [4096, 1 << 20])
@pytest.mark.parametrize("kind", ["descriptor", "stream"])
def test_scatter_reads_put_every_byte_in_its_place(tmp_path, whole, piece, kind):
    rng = random.Random(piece + whole)
    data = rng.randbytes(2_000_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    spans = _layout(len(data), rng)
    scratch, stage = memoryview(bytearray(SKIP)), memoryview(bytearray(piece))
    seen, read = bytearray(), 0
    f = open(path, "rb") if kind == "descriptor" else _Stream(data)
    assert (fd_of(f) is not None) == (kind == "descriptor")
    with f:
        for at, views in batches(spans, scratch, whole=whole, piece=piece):
            assert sum(len(v) for v in views) <= piece
            read_batch(f, fd_of(f), at, views, stage)
            if whole:  # what a checksum sees, in order, before the next batch reuses the scratch
                assert at == len(seen)
                seen += b"".join(views)
            read += sum(len(v) for v in views)
    for offset, n, dst in spans:
        if dst is not None:
            assert dst == data[offset : offset + n]
    if whole:
        assert seen == data
    else:  # long gaps are skipped
        assert read == len(data) - sum(n for _, n, dst in spans if dst is None and n >= SKIP) < len(data)


def test_a_file_shorter_than_its_spans_is_an_error(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    with open(path, "rb") as f, pytest.raises(OSError, match="unexpected end of file"):
        read_batch(f, fd_of(f), 50, [memoryview(bytearray(40)), memoryview(bytearray(40))], memoryview(bytearray(80)))
