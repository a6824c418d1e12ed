"""Checkpoints on S3 (a real moto server over HTTP, through s3fs), from real multi-rank jobs."""

import s3fs
import torch

from distckpt import Checkpointer

from harness import run_ranks
from models import clone_state, make_training, tensors_equal, train


def _job(rank, world, url, options, mode, steps):
    model, optim, sched = make_training(seed=0)
    with Checkpointer(
        url, {"model": model, "optim": optim, "sched": sched}, mode=mode, storage_options=options
    ) as ckpt:
        info = ckpt.restore()
        first = info.step if info else 0
        for step in range(first + 1, steps + 1):
            train(model, optim, sched, 1, seed=step)
            if step % 2 == 0:
                ckpt.save(step)
        listed = [c.step for c in ckpt.list()]
    return clone_state(model.state_dict()), listed


def test_two_rank_jobs_save_and_resume_on_s3(s3_root, s3_options):
    for mode in ("sharded", "chief"):
        url = f"{s3_root}-{mode}"
        run_ranks(_job, 2, url, s3_options, mode, 4)
        out = run_ranks(_job, 2, url, s3_options, mode, 6)
        single = run_ranks(_job, 1, url + "-ref", s3_options, mode, 6, init=False)
        assert tensors_equal(out[0][0], single[0][0]) and tensors_equal(out[1][0], single[0][0])
        assert out[0][1] == [2, 4, 6]
        fs = s3fs.S3FileSystem(**s3_options)
        assert fs.exists(f"{url}/step_000000000006/manifest.json")


def test_uncommitted_s3_prefix_is_not_listed(s3_root, s3_options):
    t = torch.ones(3)
    with Checkpointer(s3_root, {"t": t}, storage_options=s3_options) as ckpt:
        ckpt.save(1)
    fs = s3fs.S3FileSystem(**s3_options)
    fs.pipe(f"{s3_root}/step_000000000002/__0_0.distcp", b"partial upload")
    with Checkpointer(s3_root, {"t": t}, storage_options=s3_options) as ckpt:
        assert [c.step for c in ckpt.list()] == [1]
        assert ckpt.restore().step == 1
