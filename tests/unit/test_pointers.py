"""``latest.json`` / ``best.json``: written after the commit, read only when the manifest
agrees, ignored when stale; with a local tier they live on the primary, after the upload."""

import json
import os

import torch

import distckpt
from distckpt import KeepBest, KeepLast


def test_pointers_name_the_newest_and_the_best_committed_steps(root):
    with distckpt.Checkpointer(root, {"t": torch.zeros(2)}, best="loss") as ckpt:
        for step, loss in [(1, 0.5), (2, 0.1), (3, 0.3)]:
            ckpt.save(step, meta={"loss": loss})
    reader = distckpt.open(root)
    assert reader.pointer("latest").step == 3 and reader.pointer("best").step == 2
    doc = json.load(open(os.path.join(root, "latest.json")))
    assert doc["dir"] == "step_000000000003" and doc["meta"] == {"loss": 0.3}


def test_best_comes_from_the_retention_policy_when_not_given(root):
    with distckpt.Checkpointer(
        root, {"t": torch.zeros(2)}, keep=KeepLast(1) | KeepBest(1, metric="acc", mode="max")
    ) as ckpt:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
            ckpt.save(step, meta={"acc": acc})
        assert [c.step for c in ckpt.list()] == [2, 3]
    assert distckpt.open(root).pointer("best").step == 2


def test_a_stale_or_damaged_pointer_is_ignored_never_trusted(root):
    with distckpt.Checkpointer(root, {"t": torch.zeros(2)}) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    reader = distckpt.open(root)
    with open(os.path.join(root, "latest.json"), "w") as f:
        json.dump({"step": 9, "dir": "step_000000000009"}, f)  # a step that was never committed
    assert reader.pointer("latest") is None and reader.resolve() == 2  # the manifests win
    with open(os.path.join(root, "latest.json"), "w") as f:
        f.write("{not json")
    assert reader.pointer("latest") is None
    assert reader.pointer("best") is None  # no ranking was configured: no best.json


def test_pointers_with_a_local_tier_live_on_the_primary_after_the_upload(tmp_path):
    root, local = str(tmp_path / "remote"), str(tmp_path / "local")
    with distckpt.Checkpointer(root, {"t": torch.zeros(2)}, local_dir=local, async_save=True) as ckpt:
        ckpt.save(1)
        ckpt.save(2)
    assert distckpt.open(root).pointer("latest").step == 2
    assert not os.path.exists(os.path.join(local, "latest.json"))


def test_deleting_the_best_step_leaves_a_stale_pointer_that_is_ignored(root):
    with distckpt.Checkpointer(root, {"t": torch.zeros(2)}, best="loss") as ckpt:
        ckpt.save(1, meta={"loss": 0.1})
        ckpt.save(2, meta={"loss": 0.9})
        ckpt.wait()  # pointers follow the commit on the retention thread: let it finish
        assert distckpt.open(root).pointer("best").step == 1
        assert ckpt.delete(keep=KeepLast(1)) == [1]
        assert distckpt.open(root).pointer("best").step == 2  # delete() brings the pointers up to date
    distckpt.Checkpointer(root, {"t": torch.zeros(2)}, read_only=True).close()
    os.rename(os.path.join(root, "step_000000000002"), os.path.join(root, "gone"))
    assert distckpt.open(root).pointer("best") is None
