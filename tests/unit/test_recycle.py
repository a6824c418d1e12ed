"""Deleted steps' data files written over by the next save (``distckpt/layout/recycle.py``):
the files move from retention to the next save, what that save writes is exact whatever the
old files held (bigger or smaller), plain DCP still loads it, and the pool is emptied by
``close`` and ``distckpt gc``, never made on memory file systems, and off on request."""

import glob
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import distckpt
from distckpt.errors import CorruptCheckpointError
from distckpt.layout import recycle
from distckpt.storage import open_storage
from distckpt.tools.gc import plan_gc, run_gc
from distckpt.tools.reader import CheckpointReader


def _state(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(n + i, 1024, generator=g) for i in range(3)}  # big items: the O_DIRECT path


def _inodes(root: str, step: int) -> set[int]:
    return {os.stat(p).st_ino for p in glob.glob(os.path.join(root, f"step_*{step}", "*.distcp"))}


def _pool(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, recycle.POOL, "*")))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_hands_deleted_files_to_the_next_save(root, async_save):
    assert recycle.fs_type(os.path.dirname(root)) not in recycle._MEMORY_FS  # a disk, as users' roots
    app = {"model": _state(600, 0)}
    ckpt = distckpt.Checkpointer(root, app, async_save=async_save, keep=distckpt.Keep(last=1))
    ckpt.save(1).wait()
    first = _inodes(root, 1)
    ckpt.save(2).wait()
    ckpt.wait()  # retention of step 1 runs after the commit
    assert {os.stat(p).st_ino for p in _pool(root)} == first  # step 1's files, kept
    second = _inodes(root, 2)
    # the next state is smaller: the recycled files are longer than what is written over them
    app["model"].update(_state(300, 1))
    ckpt.save(3).wait()
    ckpt.wait()
    assert _inodes(root, 3) == first  # written over, not new files
    assert {os.stat(p).st_ino for p in _pool(root)} == second
    target = {"model": {k: torch.zeros_like(v) for k, v in app["model"].items()}}
    distckpt.Checkpointer(root, target, read_only=True).restore()
    assert all(torch.equal(target["model"][k], v) for k, v in app["model"].items())
    plain = {k: torch.zeros_like(v) for k, v in app["model"].items()}  # interop: plain DCP reads it
    dcp.load({"model": plain}, checkpoint_id=glob.glob(os.path.join(root, "step_*3"))[0])
    assert all(torch.equal(plain[k], v) for k, v in app["model"].items())
    # and the state grows again: longer than the recycled files
    app["model"].update(_state(900, 2))
    ckpt.save(4).wait()
    ckpt.close()
    assert not os.path.exists(os.path.join(root, recycle.POOL))  # close gives the space back
    target = {"model": {k: torch.zeros_like(v) for k, v in app["model"].items()}}
    distckpt.Checkpointer(root, target).restore()
    assert all(torch.equal(target["model"][k], v) for k, v in app["model"].items())


def test_a_local_tier_on_disk_recycles_too(tmp_path):
    """With ``local_dir`` (node-local disk in front of the job's URL), the local tier's
    pruning hands its deleted steps' files to the next local save; uploads are unaffected."""
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    app = {"model": _state(200, 0)}
    ckpt = distckpt.Checkpointer(remote, app, async_save=True, local_dir=local, local_keep=1)
    ckpt.save(1).wait()
    ckpt.wait()  # uploaded: step 1 may be pruned locally after the next commit
    first = _inodes(local, 1)
    for step in (2, 3):
        for t in app["model"].values():
            t.add_(1)
        ckpt.save(step).wait()
        ckpt.wait()
    assert _inodes(local, 3) == first
    ckpt.close()
    assert not os.path.exists(os.path.join(local, recycle.POOL))
    target = {"model": {k: torch.zeros_like(v) for k, v in app["model"].items()}}
    distckpt.Checkpointer(remote, target, read_only=True).restore()  # the remote copy of step 3
    assert all(torch.equal(target["model"][k], v) for k, v in app["model"].items())


def test_gc_lists_and_removes_the_kept_files(root):
    ckpt = distckpt.Checkpointer(root, {"model": _state(200, 0)}, async_save=False, keep=distckpt.Keep(last=1))
    for step in (1, 2):
        ckpt.save(step).wait()
    ckpt.wait()
    assert _pool(root)
    reader = CheckpointReader(root)
    assert [(x.name, x.kind) for x in reader.leftovers()] == [
        (recycle.POOL, "files kept for the next save to write over")
    ]
    plan = plan_gc(reader, distckpt.Keep(last=1))
    assert [x.name for x in plan.spared] == [recycle.POOL]  # the running job writes over them next
    result = run_gc(reader, plan_gc(reader, distckpt.Keep(last=1), force=True))
    assert result.ok and _pool(root) == []
    assert [c.step for c in reader.list()] == [2]
    ckpt.save(3).wait()  # the job goes on with new files
    ckpt.close()
    assert [c.step for c in reader.list()] == [3]


def test_turned_off_deletes_as_before(root, monkeypatch):
    monkeypatch.setenv("DISTCKPT_RECYCLE", "0")
    ckpt = distckpt.Checkpointer(root, {"model": _state(200, 0)}, async_save=False, keep=distckpt.Keep(last=1))
    for step in (1, 2, 3):
        ckpt.save(step).wait()
    ckpt.wait()
    assert not os.path.exists(os.path.join(root, recycle.POOL))
    ckpt.close()


def test_never_on_memory_file_systems(tmp_path):
    assert recycle.fs_type("/dev/shm") == "tmpfs"
    assert recycle.fs_type(str(tmp_path)) not in ("", "tmpfs")
    assert not recycle.enabled(open_storage("/dev/shm/distckpt-recycle-test"))
    assert recycle.enabled(open_storage(str(tmp_path)))


@pytest.mark.parametrize("verify", [True, False], ids=["checksums", "sizes only"])
def test_a_restore_of_a_step_deleted_and_written_over_meanwhile_says_so(root, monkeypatch, verify):
    """Another job (an evaluation, here a read-only Checkpointer) restores step 1 while the
    job writing to the root deletes it and writes its next save over step 1's files: the
    restore must not hand back the next save's bytes, even without checksums."""
    import distckpt.dcp.shared_reader as shared_reader

    app = {"model": _state(300, 0)}
    writer = distckpt.Checkpointer(root, app, async_save=False, keep=distckpt.Keep(last=2))
    writer.save(1).wait()
    writer.save(2).wait()
    old = {k: v.clone() for k, v in app["model"].items()}
    real, fired = shared_reader.read_batch, []

    def read_batch(*args):
        real(*args)
        if not fired:  # after the reader's first read of step 1's data: step 3 deletes it, step 4 takes its files
            fired.append(True)
            for step in (3, 4):
                for t in app["model"].values():
                    t.add_(1)
                writer.save(step).wait()
                writer.wait()

    monkeypatch.setattr(shared_reader, "read_batch", read_batch)
    target = {"model": {k: torch.zeros_like(v) for k, v in old.items()}}
    reader = distckpt.Checkpointer(root, target, read_only=True)
    with pytest.raises(CorruptCheckpointError, match="deleted while it was being read"):
        reader.restore(step=1, verify=verify)
    assert fired and _inodes(root, 4)  # it did happen: step 4 wrote over step 1's files
    writer.close()
