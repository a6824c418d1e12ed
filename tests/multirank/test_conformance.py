"""One conformance suite, every backend: local disk, S3 through s3fs on two servers over HTTP
(moto, and s3rver, which ignores If-None-Match), and a local tier in front of S3 (one shared
local dir, or one per simulated node)."""

import json

import fsspec
import pytest
import torch

import distckpt
from distckpt import Checkpointer, Keep
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, tensors_equal, train
from tests.support.s3 import s3_bucket

BACKENDS = ["local", "s3", "s3rver", "tiered", "tiered-2nodes"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    kind = request.param
    if kind == "local":
        return {"kind": kind, "url": str(tmp_path / "ckpt"), "opts": None, "local": None}
    s3_root, s3_options = s3_bucket(request, "s3rver" if kind == "s3rver" else "moto")
    local = None if kind in ("s3", "s3rver") else str(tmp_path / "local")
    return {"kind": kind, "url": s3_root, "opts": s3_options, "local": local}


def _kwargs(b, rank, **extra):
    kw = {"storage_options": b["opts"], **extra}
    if b["local"]:
        kw["local_dir"] = f"{b['local']}/node{rank}" if b["kind"] == "tiered-2nodes" else b["local"]
    return kw


def _fs(b):
    return fsspec.core.url_to_fs(b["url"], **(b["opts"] or {}))


def _job(rank, world, b, mode, steps, async_save):
    model, optim, sched = make_training(seed=0)
    ckpt = Checkpointer(
        b["url"],
        {"model": model, "optim": optim, "sched": sched},
        mode=mode,
        async_save=async_save,
        **_kwargs(b, rank, keep=Keep(last=2)),
    )
    for step in range(1, steps + 1):
        train(model, optim, sched, 1, seed=step)
        ckpt.save(step, meta={"loss": 1.0 / step})
    ckpt.close()
    return clone_state(model.state_dict()), clone_state(optim.state_dict()), [(c.step, c.tier) for c in ckpt.list()]


def _restore(rank, world, b, mode, step):
    model, optim, _ = make_training(seed=7)
    with Checkpointer(
        b["url"], {"model": model, "optim": optim}, mode=mode, **_kwargs(b, rank, read_only=True)
    ) as ckpt:
        info = ckpt.restore(step=step, strict=False)
    return clone_state(model.state_dict()), clone_state(optim.state_dict()), info.step, info.tier


@pytest.mark.parametrize("mode,async_save", [("sharded", True), ("chief", False)])
def test_two_rank_save_then_restore_bit_exact(backend, mode, async_save):
    saved = run_ranks(_job, 2, backend, mode, 3, async_save, timeout=300)
    model_sd, optim_sd, listed = saved[0]
    assert [s for s, _ in listed] == [2, 3]  # retention kept the newest two, everywhere
    out = run_ranks(_restore, 2, backend, mode, None, timeout=240)
    for m, o, step, _tier in out:
        assert step == 3 and tensors_equal(m, model_sd) and tensors_equal(o["state"], optim_sd["state"])
    fs, root = _fs(backend)
    assert fs.exists(f"{root}/step_000000000003/manifest.json")  # on the primary URL in every case
    if backend["kind"] == "tiered":
        assert {t for *_, t in out} == {"local"}  # the fast tier was used


def test_reshard_two_ranks_to_one_without_process_group(backend):
    saved = run_ranks(_job, 2, backend, "sharded", 2, False, timeout=300)
    out = run_ranks(_restore, 1, backend, "sharded", 2, init=False, timeout=240)
    assert tensors_equal(out[0][0], saved[0][0])


def test_uncommitted_work_is_ignored_then_cleaned(backend):
    run_ranks(_job, 1, backend, "sharded", 1, False, init=False)
    fs, root = _fs(backend)
    fs.makedirs(f"{root}/step_000000000009", exist_ok=True)
    fs.pipe(f"{root}/step_000000000009/__0_0.distcp", b"an interrupted upload")
    out = run_ranks(_restore, 1, backend, "sharded", None, init=False)
    assert out[0][2] == 1  # step 9 has no manifest: not a checkpoint
    run_ranks(_job, 1, backend, "sharded", 0, False, init=False)  # a writer cleans leftovers on start
    assert not fs.exists(f"{root}/step_000000000009")


def _best(rank, world, b):
    t = torch.zeros(4)
    with Checkpointer(b["url"], {"t": t}, **_kwargs(b, rank)) as ckpt:
        for step, loss in [(1, 0.5), (2, 0.1), (3, 0.9)]:
            t.fill_(step)
            ckpt.save(step, meta={"loss": loss})
        ckpt.wait()
        best = ckpt.restore(min_key="loss")
        return best.step, t[0].item(), [c.step for c in ckpt.list()]


def test_restore_by_meta_and_list(backend):
    assert run_ranks(_best, 2, backend) == [(2, 2.0, [1, 2, 3])] * 2


def _corrupt_newest_then_restore(rank, world, b, corrupt_local):
    t = torch.zeros(1024)
    with Checkpointer(b["url"], {"t": t}, **_kwargs(b, rank, write_threads=1)) as ckpt:
        for step in (1, 2):
            t.fill_(step)
            ckpt.save(step)
        ckpt.wait()
        if rank == 0:
            path = f"{corrupt_local if corrupt_local else ''}"
            fs, root = (fsspec.filesystem("file"), path) if corrupt_local else _fs(b)
            stepdir = f"{root}/step_000000000002"
            name = next(
                n for n in sorted(json.loads(fs.cat(f"{stepdir}/manifest.json"))["files"]) if n.endswith(".distcp")
            )
            data = bytearray(fs.cat(f"{stepdir}/{name}"))
            data[-100] ^= 0xFF
            fs.pipe(f"{stepdir}/{name}", bytes(data))
        torch.distributed.barrier() if world > 1 else None
        t.zero_()
        info = ckpt.restore()
    return info.step, info.tier, t[0].item()


def test_damaged_newest_step_falls_back_on_every_backend(backend):
    if backend["local"]:
        # the local copy is damaged: the same step comes from the primary URL instead
        local = _kwargs(backend, 0)["local_dir"]
        assert run_ranks(_corrupt_newest_then_restore, 1, backend, local, init=False) == [(2, "primary", 2.0)]
    else:
        # the only copy is damaged: everyone falls back to the older step
        out = run_ranks(_corrupt_newest_then_restore, 1, backend, None, init=False)
        assert out[0][0] == 1 and out[0][2] == 1.0


def _upload_fails(rank, world, b):
    t = torch.zeros(256)
    ckpt = Checkpointer(b["url"], {"t": t}, **_kwargs(b, rank), timeout=240)
    t.fill_(1)
    ckpt.save(1)  # committed locally at once; the upload to S3 fails in the background
    try:
        ckpt.wait()
        error = None
    except distckpt.CheckpointError as e:
        error = str(e)
    t.zero_()
    info = ckpt.restore()
    ckpt.close()
    return error, info.step, info.tier, t[0].item()


def test_a_failed_upload_is_reported_and_the_local_copy_still_restores(tmp_path, s3_server, s3_root):
    from tests.support.faults import FaultProxy

    proxy = FaultProxy(s3_server["endpoint_url"])
    try:
        proxy.fail("step_000000000001", status=500)
        opts = {**s3_server, "endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 2}}}
        b = {"kind": "tiered", "url": s3_root, "opts": opts, "local": str(tmp_path / "local")}
        out = run_ranks(_upload_fails, 2, b, timeout=300)
        for error, step, tier, value in out:
            assert error and "uploading step 1" in error
            assert (step, tier, value) == (1, "local", 1.0)
        fs = fsspec.filesystem("s3", **opts)
        assert not fs.exists(f"{s3_root}/step_000000000001/manifest.json")
    finally:
        proxy.close()
