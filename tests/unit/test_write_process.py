"""The writer process (``distckpt/dcp/write_process.py``): background saves staged in shared
memory are written by a child process, byte-for-byte what the writer threads write; its
death mid-save is a clear error and the next save works; it never outlives its parent; and
it lets go of an arena once the arena is closed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

import distckpt
from distckpt.arena import shared_arenas
from distckpt.dcp.write_process import WRITER

pytestmark = pytest.mark.timeout(120)


def _state():
    torch.manual_seed(0)
    base = torch.randn(64, 48)
    return {
        "w": torch.randn(512, 256),
        "bf16": torch.randn(33, 7).bfloat16(),
        "transposed": base.t(),
        "ints": torch.arange(1000, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }


def _files(step_dir):
    return {n: open(os.path.join(step_dir, n), "rb").read() for n in os.listdir(step_dir) if n.endswith(".distcp")}


def _url(ckpt, step):
    (info,) = [i for i in ckpt.list() if i.step == step]
    return info.url


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode()


def test_background_saves_are_written_by_the_writer_process_as_the_threads_write_them(tmp_path):
    state = _state()
    by_process = distckpt.Checkpointer(str(tmp_path / "p"), {"s": state}, async_save=True)
    by_threads = distckpt.Checkpointer(str(tmp_path / "t"), {"s": state}, async_save=False)  # live tensors
    for step in (1, 2):  # the first through dcp.save, the second from the plan cache
        by_process.save(step).wait()
        by_threads.save(step).wait()
        assert WRITER.pid is not None and WRITER.pid != os.getpid()
        assert "write_process.py" in _cmdline(WRITER.pid)
        p, t = _files(_url(by_process, step)), _files(_url(by_threads, step))
        assert p and p == t
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    dcp.load(back, checkpoint_id=_url(by_process, 2))  # plain DCP reads it
    assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    reader = distckpt.Checkpointer(str(tmp_path / "p"), back, read_only=True)
    assert reader.restore(verify=True).step == 2  # the child's checksums match the bytes
    for c in (by_process, by_threads, reader):
        c.close()


def test_a_writer_process_killed_mid_save_fails_that_save_clearly_and_the_next_save_works(tmp_path):
    state = _state()
    ckpt = distckpt.Checkpointer(str(tmp_path), {"s": state}, async_save=True, keep=distckpt.Keep(last=5))
    ckpt.save(1).wait()
    pid = WRITER.pid
    os.kill(pid, signal.SIGSTOP)  # the request reaches it, the answer never comes
    handle = ckpt.save(2)
    time.sleep(0.5)
    assert not handle.done()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(distckpt.CheckpointError, match=r"writer process \(pid \d+\) was killed by signal 9"):
        handle.wait()
    state["w"].add_(1)
    ckpt.save(3).wait()
    assert WRITER.pid not in (None, pid)
    assert [i.step for i in ckpt.list()] == [1, 3]
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    reader = distckpt.Checkpointer(str(tmp_path), back, read_only=True)
    assert reader.restore(verify=True).step == 3
    assert torch.equal(back["s"]["w"], state["w"])
    ckpt.close()
    reader.close()


def test_the_writer_process_exits_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import time, torch, distckpt
        from distckpt.dcp.write_process import WRITER
        ck = distckpt.Checkpointer({str(tmp_path)!r}, {{"w": torch.randn(100, 100)}}, async_save=True)
        ck.save(1).wait()
        print(WRITER.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert "write_process.py" in _cmdline(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and _state_of(child) != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{child}") or _state_of(child) == "Z"


def _state_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_closed_checkpointers_staging_memory_is_unmapped_by_the_writer_process(tmp_path):
    before = set(shared_arenas())
    ckpt = distckpt.Checkpointer(str(tmp_path), {"w": torch.randn(256, 256)}, async_save=True)
    ckpt.save(1).wait()
    ours = [f"/memfd:distckpt-staging-{aid} " for aid in set(shared_arenas()) - before]
    assert ours

    def mapped():
        with open(f"/proc/{WRITER.pid}/maps") as f:
            maps = f.read().replace("(deleted)", "")
        return [name for name in ours if name in maps]

    assert mapped() == ours
    ckpt.close()
    deadline = time.monotonic() + 5
    while mapped() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mapped() == []


def test_distckpt_write_process_0_keeps_writes_in_the_training_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_WRITE_PROCESS", "0")
    WRITER.close()
    state = _state()
    ckpt = distckpt.Checkpointer(str(tmp_path), {"s": state}, async_save=True)
    ckpt.save(1).wait()
    assert WRITER.pid is None
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    assert distckpt.Checkpointer(str(tmp_path), back, read_only=True).restore(verify=True).step == 1
    assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    ckpt.close()
