"""Damaged, foreign and hostile checkpoints: a clear error or a safe fallback, never a wrong restore."""

import json
import logging
import os
import pickle

import pytest
import torch

from distckpt import Checkpointer, CorruptCheckpointError, DistckptError
from tests.support.faults import doctor


def _two_steps(root):
    t = torch.arange(1000, dtype=torch.float32)
    with Checkpointer(root, {"t": t}, write_threads=1) as ckpt:
        ckpt.save(1)
        t.add_(1)
        ckpt.save(2)
    return os.path.join(root, "step_000000000002")


def _data_file(stepdir):
    return next(os.path.join(stepdir, n) for n in sorted(os.listdir(stepdir)) if n.endswith(".distcp"))


def _restore(root, **kw):
    t = torch.zeros(1000)
    with Checkpointer(root, {"t": t}) as ckpt:
        info = ckpt.restore(**kw)
    return info, t


def test_truncated_newest_step_falls_back_to_the_older_one_with_a_warning(root, caplog):
    path = _data_file(_two_steps(root))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        info, t = _restore(root)
    assert info.step == 1 and torch.equal(t, torch.arange(1000.0))
    assert "step 2 cannot be restored" in caplog.text and "truncated" in caplog.text


def test_truncated_step_asked_for_by_number_is_an_error_naming_the_file(root):
    path = _data_file(_two_steps(root))
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorruptCheckpointError, match=rf"step 2 .*{os.path.basename(path)}"):
        _restore(root, step=2)


def test_flipped_byte_is_caught_by_the_checksum(root):
    path = _data_file(_two_steps(root))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 200)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        _restore(root, step=2)
    info, t = _restore(root)
    assert info.step == 1 and torch.equal(t, torch.arange(1000.0))


def test_every_step_damaged_is_an_error_not_a_fresh_start(root):
    stepdir = _two_steps(root)
    for step in ("step_000000000001", "step_000000000002"):
        open(os.path.join(root, step, "manifest.json"), "w").write("{not json")
    with pytest.raises(CorruptCheckpointError, match="no committed checkpoint .* could be restored"):
        _restore(root)
    assert os.path.isdir(stepdir)  # nothing was deleted


def test_garbage_directory_has_no_checkpoints(root):
    os.makedirs(os.path.join(root, "step_000000000009"))
    open(os.path.join(root, "notes.txt"), "w").write("hello")
    open(os.path.join(root, "step_000000000009", "junk.bin"), "wb").write(os.urandom(100))
    info, _ = _restore(root)
    assert info is None
    assert os.path.exists(os.path.join(root, "notes.txt"))  # foreign files are left alone


@pytest.mark.parametrize("make", ["file", "step", "dcp"])
def test_wrong_root_is_refused_with_what_to_do(tmp_path, make):
    if make == "file":
        target = tmp_path / "afile"
        target.write_text("x")
        match = "is a file"
    else:
        root = str(tmp_path / "r")
        _two_steps(root)
        target = tmp_path / "r" / "step_000000000002"
        if make == "dcp":
            os.remove(target / "manifest.json")
        match = "not a checkpoint root"
    with pytest.raises(DistckptError, match=match):
        Checkpointer(str(target), {"t": torch.zeros(1)})


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("index", [True, False], ids=["json-index", "older-step-without-index"])
def test_a_doctored_metadata_pickle_is_never_executed(root, tmp_path, monkeypatch, index):
    monkeypatch.chdir(tmp_path)
    stepdir = _two_steps(root)
    doctor(stepdir, ".metadata", pickle.dumps(_Boom()))  # only the unpickler stands in the way
    if index:
        # distckpt's restore reads DCP's metadata from state.json's JSON index: the pickle
        # is never opened, and the step restores bit-exact
        info, t = _restore(root, step=2)
        assert info.step == 2 and torch.equal(t, torch.arange(1000, dtype=torch.float32) + 1)
    else:
        # a step without the index (written before it existed): the restricted unpickler refuses
        state_path = os.path.join(stepdir, "state.json")
        state = json.load(open(state_path))
        del state["dcp_metadata"]
        doctor(stepdir, "state.json", json.dumps(state).encode())
        with pytest.raises(CorruptCheckpointError, match="refusing to load posix.system|not allowed"):
            _restore(root, step=2)
    assert not os.path.exists(tmp_path / "PWNED")
