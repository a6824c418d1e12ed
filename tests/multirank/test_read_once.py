"""Restores read every byte from storage once, whatever the number of ranks (issue #14).

DDP-like state (every rank holds the same tensors), saved by 2 ranks in chief and sharded
mode, restored by 1, 2 and 4 ranks. What storage served is measured outside distckpt: on
local disk the bytes each rank process passed through read() (``rchar`` in /proc, which
does not count gloo's socket traffic), on S3 the response bytes the server sent through a
counting proxy. Without sharing, N ranks would read the checkpoint N times.
"""

import os

import pytest
import s3fs
import torch

from distckpt import Checkpointer
from distckpt.dcp.read_schedule import CHUNK
from tests.support.faults import FaultProxy
from tests.support.harness import run_ranks

SIZES = (1_500_000, 1_000_000, 700_000, 300_000, 4096, 10)  # ~14 MB of fp32, big and small items


def _expected(step):
    g = torch.Generator().manual_seed(step)
    return {f"w{i}": torch.randn(n, generator=g) for i, n in enumerate(SIZES)}


def _save(rank, world, root, mode, options, steps):
    state = {k: torch.zeros_like(v) for k, v in _expected(0).items()}
    with Checkpointer(root, {"state": state}, mode=mode, storage_options=options) as ckpt:
        for step in steps:
            for k, v in _expected(step).items():
                state[k].copy_(v)
            ckpt.save(step).wait()


def _rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _restore(rank, world, root, mode, options, measure_twice):
    state = {k: torch.zeros_like(v) for k, v in _expected(0).items()}
    with Checkpointer(root, {"state": state}, mode=mode, storage_options=options) as ckpt:
        if measure_twice:  # the first restore imports what it needs (rchar counts .py reads too)
            ckpt.restore()
            for v in state.values():
                v.zero_()
        before = _rchar()
        info = ckpt.restore()
        read = _rchar() - before
        counts = ckpt._parts.restorer.last_read[rank]
    return info.step, read, counts.bytes, counts.broadcast_bytes, state


def _step_bytes(root, step):
    d = os.path.join(root, f"step_{step:012d}")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


@pytest.mark.parametrize("mode", ["chief", "sharded"])
def test_local_restore_reads_each_byte_once_at_any_number_of_ranks(tmp_path, mode):
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 2, root, mode, None, (5,))
    total = _step_bytes(root, 5)
    want = _expected(5)
    for world in (1, 2, 4):
        results = run_ranks(_restore, world, root, mode, None, True)
        read = sum(r[1] for r in results)
        assert all(r[0] == 5 for r in results)
        for _, _, _, _, state in results:
            assert all(torch.equal(state[k], want[k]) for k in want)  # every rank, bit-exact
        assert read <= 1.1 * total, f"{world} ranks read {read / total:.2f}x the checkpoint"
        assert sum(r[2] for r in results) >= total * 0.9  # the data files, read once in all
        if world > 1:  # the other ranks got their bytes over gloo instead
            assert sum(r[3] for r in results) >= (world - 1) * total * 0.5


def test_s3_restore_asks_the_server_for_each_byte_once(s3_server, tmp_path):
    proxy = FaultProxy(s3_server["endpoint_url"])
    try:
        options = dict(s3_server, endpoint_url=proxy.endpoint)
        bucket = f"read-once-{os.getpid()}"
        s3fs.S3FileSystem(**options).mkdir(bucket)
        root = f"s3://{bucket}/run"
        run_ranks(_save, 2, root, "chief", options, (5,))
        fs = s3fs.S3FileSystem(**options)
        total = sum(fs.size(p) for p in fs.ls(f"{bucket}/run/step_{5:012d}"))
        proxy.reset()
        results = run_ranks(_restore, 4, root, "chief", options, False)
        served = proxy.served["GET"]
        want = _expected(5)
        assert all(r[0] == 5 and all(torch.equal(r[4][k], want[k]) for k in want) for r in results)
        assert served <= 1.1 * total, f"4 ranks were served {served / total:.2f}x the checkpoint ({proxy.requests})"
        assert proxy.served["LIST"] < 0.05 * total
    finally:
        proxy.close()


def test_damage_found_mid_load_makes_every_rank_fall_back_together(tmp_path):
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 2, root, "chief", None, (1, 2))
    newest = os.path.join(root, f"step_{2:012d}")
    data = max(
        (f for f in os.listdir(newest) if f.endswith(".distcp")), key=lambda f: os.path.getsize(os.path.join(newest, f))
    )
    path = os.path.join(newest, data)
    with open(path, "r+b") as f:  # one flipped byte in the middle of a tensor: same size
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    results = run_ranks(_restore, 4, root, "chief", None, False)
    want = _expected(1)
    for step, _, _, _, state in results:
        assert step == 1  # every rank, together
        assert all(torch.equal(state[k], want[k]) for k in want)


BIG = {"big": 20_000_000, "small": 1000}  # 80 MB: chunks (read_schedule.CHUNK) that lie inside its data


def _big(step):
    g = torch.Generator().manual_seed(step)
    return {k: torch.randn(n, generator=g) for k, n in BIG.items()}


def _save_big(rank, world, root):
    state = {k: torch.zeros(n) for k, n in BIG.items()}
    with Checkpointer(root, {"state": state}, mode="chief") as ckpt:
        for step in (1, 2):
            for k, v in _big(step).items():
                state[k].copy_(v)
            ckpt.save(step).wait()


def _restore_big(rank, world, root):
    state = {k: torch.full((n,), float("nan")) for k, n in BIG.items()}
    with Checkpointer(root, {"state": state}, mode="chief") as ckpt:
        info = ckpt.restore()
        counts = ckpt._parts.restorer.last_read[rank]
    return info.step, counts.broadcast_bytes, counts.in_place, state, counts.read_in_place


def test_chunks_received_inside_a_tensor_land_in_place_and_damage_still_falls_back(tmp_path):
    root = str(tmp_path / "ckpt")
    run_ranks(_save_big, 1, root)
    results = run_ranks(_restore_big, 2, root)
    want = _big(2)
    for step, _, _, state, _ in results:
        assert step == 2 and all(torch.equal(state[k], want[k]) for k in want)
    # the files are striped: one rank reads the big tensor's file, the other receives it;
    # both put the chunks that lie inside the tensor straight into it
    receiver = max(results, key=lambda r: r[1])
    reader = min(results, key=lambda r: r[1])
    received, in_place = receiver[1], receiver[2]
    assert received >= BIG["big"] * 4 and BIG["big"] * 4 - 2 * CHUNK <= in_place <= received
    assert reader[4] >= BIG["big"] * 4 - 2 * CHUNK

    # damage inside the big tensor: the receiver got it in place, yet every rank falls back
    newest = os.path.join(root, f"step_{2:012d}")
    path = max((os.path.join(newest, f) for f in os.listdir(newest) if f.endswith(".distcp")), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4 * 1000 - 4096)  # near the end of the big tensor's data
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    want = _big(1)
    for step, _, _, state, _ in run_ranks(_restore_big, 2, root):
        assert step == 1 and all(torch.equal(state[k], want[k]) for k in want)


def _restore_counting_dcp_plans(rank, world, root, rank_without_index_plan):
    import distckpt.dcp as bridge

    calls, real = [], bridge._dcp_load
    bridge._dcp_load = lambda *a, **k: (calls.append(1), real(*a, **k))[1]  # a spy: DCP still loads
    if rank == rank_without_index_plan:  # as for a rank whose state holds a DTensor
        bridge.direct.plan = lambda tensors, index: None
    state = {k: torch.zeros_like(v) for k, v in _expected(0).items()}
    with Checkpointer(root, {"state": state}, mode="sharded") as ckpt:
        info = ckpt.restore()
    return info.step, len(calls), state


@pytest.mark.parametrize("rank_without_index_plan", [None, 1], ids=["all-from-the-index", "one-rank-needs-dcp"])
def test_sharded_ranks_agree_on_how_the_load_is_planned(tmp_path, rank_without_index_plan):
    """DCP's load is collective: if one rank cannot plan from the index, every rank goes
    through DCP's planner (no hang), and the restore is bit-exact either way."""
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 2, root, "sharded", None, (5,))
    results = run_ranks(_restore_counting_dcp_plans, 2, root, rank_without_index_plan)
    want = _expected(5)
    assert [r[1] for r in results] == ([0, 0] if rank_without_index_plan is None else [1, 1])
    assert all(r[0] == 5 and all(torch.equal(r[2][k], want[k]) for k in want) for r in results)
