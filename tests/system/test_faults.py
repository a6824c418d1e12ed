"""Storage faults: S3 errors and outages mid-save, a full disk. The newest committed step
always restores bit-exact afterwards, the error says what happened, and training goes on."""

import json
import os

import pytest
import torch

from distckpt import Checkpointer, CheckpointError
from distckpt.layout.lease import LOCK
from tests.support.faults import FaultProxy, SmallDisk
from tests.support.harness import run_ranks

# a user's retry settings for a flaky endpoint: botocore retries, fewer and faster than AWS defaults
RETRIES = {
    "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 2, "read_timeout": 20}
}


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server["endpoint_url"])
    yield p
    p.close()


def _opts(proxy, s3_server):
    return {**s3_server, "endpoint_url": proxy.endpoint, **RETRIES}


def _state(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"w": torch.randn(64, 1024, generator=g), "b": torch.randn(333, generator=g)}


def _job_through_faults(rank, world, url, opts, async_save):
    # replicated state (as under DDP): every rank holds the same values
    holder = {"s": _state(0, 0)}
    ckpt = Checkpointer(url, {"state": holder}, storage_options=opts, async_save=async_save, timeout=120)
    errors = {}
    for step in (1, 2, 3):
        holder["s"] = _state(0, step)
        try:
            ckpt.save(step)
            ckpt.wait()
        except CheckpointError as e:
            errors[step] = str(e)
    ckpt.close()
    return errors, [c.step for c in ckpt.list()]


def _restore(rank, world, url, opts, step):
    holder = {"s": _state(rank, 99)}
    with Checkpointer(url, {"state": holder}, storage_options=opts, read_only=True) as ckpt:
        info = ckpt.restore()
    return info.step, all(torch.equal(holder["s"][k], v) for k, v in _state(0, step).items())


@pytest.mark.parametrize("failure", ["errors", "outage"])
def test_s3_failing_mid_save_fails_that_save_on_every_rank_and_nothing_else(s3_root, s3_server, proxy, failure):
    # every upload of step 2 fails: 500s from the server, or the connection dropped
    proxy.fail("step_000000000002", status=500 if failure == "errors" else 0)
    opts = _opts(proxy, s3_server)
    out = run_ranks(_job_through_faults, 2, s3_root, opts, True, timeout=240)
    for errors, listed in out:
        assert list(errors) == [2] and "step 2" in errors[2]
        assert listed == [1, 3]  # step 2 never looked committed; training went on to step 3
    assert proxy.injected > 0
    proxy.heal()
    assert run_ranks(_restore, 2, s3_root, opts, 3) == [(3, True), (3, True)]


def test_transient_s3_errors_are_retried_by_botocore_and_the_save_succeeds(s3_root, s3_server, proxy):
    proxy.fail("step_000000000001", status=503, times=2)  # SlowDown twice, then fine
    opts = _opts(proxy, s3_server)
    holder = {"s": _state(0, 1)}
    with Checkpointer(s3_root, {"state": holder}, storage_options=opts) as ckpt:
        assert ckpt.save(1).wait().step == 1
    assert proxy.injected == 2
    assert run_ranks(_restore, 1, s3_root, opts, 1, init=False) == [(1, True)]


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(str(tmp_path / "disk"), size_mb=12)
    yield disk.path
    disk.close()


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_newest_step(small_disk):
    root = os.path.join(small_disk, "ckpt")
    holder = {"w": torch.full((512, 1024), 1.0)}  # 2 MiB
    with Checkpointer(root, {"state": holder}, write_threads=1) as ckpt:
        ckpt.save(1)
        holder["w"] = torch.full((512, 1024), 2.0)
        ckpt.save(2)
        holder["big"] = torch.ones(4 * 1024 * 1024)  # 16 MiB: more than the disk holds
        with pytest.raises(CheckpointError, match=r"no space left .* free space or keep fewer checkpoints"):
            ckpt.save(3)
        assert [c.step for c in ckpt.list()] == [1, 2]
        assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]  # the partial step is gone
        del holder["big"]
        holder["w"] = torch.full((512, 1024), 4.0)
        ckpt.save(4)  # space came back: the job goes on
    target = {"w": torch.zeros(512, 1024)}
    with Checkpointer(root, {"state": target}, read_only=True) as reader:
        assert reader.restore(step=2).step == 2 and torch.equal(target["w"], torch.full((512, 1024), 2.0))
        assert reader.restore().step == 4 and torch.equal(target["w"], torch.full((512, 1024), 4.0))


def test_a_save_failing_in_a_root_another_job_took_over_names_the_takeover(small_disk):
    # The new holder removes a fenced job's unfinished work; whatever error that causes in
    # the old job's write, the old job must report the real cause: it lost the root.
    root = os.path.join(small_disk, "ckpt")
    with Checkpointer(root, {"state": {"big": torch.ones(4 * 1024 * 1024)}}, write_threads=1) as ckpt:
        lock = os.path.join(root, LOCK)
        doc = json.load(open(lock))
        doc["nonce"] = "another-job"
        json.dump(doc, open(lock, "w"))
        with pytest.raises(CheckpointError, match="writing step 1 failed.*taken over by another job"):
            ckpt.save(1)
        assert ckpt.list() == []
    assert json.load(open(lock))["nonce"] == "another-job"  # the other job's lease is left alone


def _memory_fills_up(rank, world, local, url):
    holder = {"w": torch.full((256, 1024), float(rank))}  # 1 MiB per rank
    out = []
    with Checkpointer(url, {"state": holder}, local_dir=local, local_keep=1, write_threads=1) as ckpt:
        out.append(ckpt.save(1).wait().tier)
        holder["big"] = torch.ones(4 * 1024 * 1024)  # 16 MiB per rank: more than node memory holds
        out.append(ckpt.save(2).wait().tier)
        del holder["big"]
        holder["w"] = torch.full((256, 1024), 3.0 + rank)
        out.append(ckpt.save(3).wait().tier)  # fits again: back to memory first
        ckpt.wait()
        listed = {c.step: c.tier for c in ckpt.list()}
    return out, listed


def test_a_save_that_does_not_fit_in_node_memory_goes_straight_to_the_remote_tier(small_disk, tmp_path):
    url = str(tmp_path / "remote")
    out = run_ranks(_memory_fills_up, 2, os.path.join(small_disk, "mem"), url)
    for tiers, listed in out:
        assert tiers == ["local", "primary", "local"]  # step 2 skipped node memory, and was not lost
        assert listed[2] == "primary" and listed[3] == "local"
    assert not [n for n in os.listdir(os.path.join(small_disk, "mem")) if n.startswith(".tmp-")]
    target = {"w": torch.zeros(256, 1024), "big": torch.zeros(4 * 1024 * 1024)}
    with Checkpointer(url, {"state": target}, read_only=True) as reader:
        assert reader.restore(step=2).tier == "primary"
        assert torch.equal(target["big"], torch.ones(4 * 1024 * 1024)) and torch.equal(
            target["w"], torch.zeros(256, 1024)
        )


def _partner_too_full(rank, world, mems, url):
    holder = {"a": torch.full((1750 * 1024,), 1.0), "b": torch.full((1750 * 1024,), 2.0)}  # 7 MB each
    with Checkpointer(url, {"state": holder}, local_dir=mems[rank], local_keep=1, upload_every=5) as ckpt:
        try:
            ckpt.save(1)
            raised = None
        except CheckpointError as e:
            raised = str(e)
        ckpt.wait()  # the upload that an unprotected save gets whatever upload_every says
        remote = sorted(int(n[5:]) for n in os.listdir(url) if n.startswith("step_"))
        return raised, remote, [c.step for c in ckpt.list()]


def test_a_partner_too_full_for_its_replica_fails_the_save_as_unprotected_and_it_is_uploaded(small_disk, tmp_path):
    mems = [str(tmp_path / "mem0"), os.path.join(small_disk, "mem1")]  # node 1: 12 MB, its own 7 MB + a 7 MB replica
    url = str(tmp_path / "remote")
    out = run_ranks(_partner_too_full, 2, mems, url)
    for raised, remote, listed in out:
        assert raised is not None and "replicating step 1" in raised, raised  # not protected, said so
        assert remote == [1] and listed == [1]  # uploaded although upload_every=5: nothing lost
    assert os.path.isdir(os.path.join(mems[1], "step_000000000001"))  # node 1 kept its own copy
    assert not [n for n in os.listdir(os.path.join(mems[1], "replicas", "node-0")) if not n.startswith(".trash")]
