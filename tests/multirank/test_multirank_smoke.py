import os

import torch

import distckpt

from tests.support.harness import run_ranks


def _save_restore(rank, world, root):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ckpt = distckpt.Checkpointer(root, {"model": model, "n": rank})
    ckpt.save(1)
    with torch.no_grad():
        model.weight.add_(1)
    ckpt.restore()
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    return torch.equal(model.weight, ref.weight), sorted(os.listdir(os.path.join(root, "step_000000000001")))


def test_two_ranks_save_restore(root):
    out = run_ranks(_save_restore, 2, root)
    assert all(ok for ok, _ in out)
    assert "manifest.json" in out[0][1]
