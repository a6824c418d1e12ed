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
from distckpt.dcp import load_dcp_metadata
from distckpt.dcp.write_process import WRITER
from distckpt.dcp.writer import frame

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


def _items(step_dir):
    """Each item's bytes, as DCP's metadata places them: {fqn: bytes}, and where they start."""
    with open(os.path.join(step_dir, ".metadata"), "rb") as f:
        md = load_dcp_metadata(f, step_dir)
    items, starts = {}, {}
    for index, info in md.storage_data.items():
        with open(os.path.join(step_dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            items[index.fqn] = f.read(info.length)
        starts[index.fqn] = info.offset
    return items, starts


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
        assert "write_child.py" in _cmdline(WRITER.pid)
        (p, _), (t, _) = _items(_url(by_process, step)), _items(_url(by_threads, step))
        assert p and p == t
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    dcp.load(back, checkpoint_id=_url(by_process, 2))  # plain DCP reads it
    assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    reader = distckpt.Checkpointer(str(tmp_path / "p"), back, read_only=True)
    assert reader.restore(verify=True).step == 2  # the child's checksums match the bytes
    for c in (by_process, by_threads, reader):
        c.close()


def test_big_items_are_placed_for_direct_io_and_load_with_plain_dcp(tmp_path):
    """Each item of at least 1 MB starts its data at a file offset congruent to where it is
    staged, modulo 4 KB (so that the disk reads it in place with O_DIRECT); DCP's metadata
    records the offsets, so plain dcp.load and distckpt's reader skip the gaps."""
    torch.manual_seed(1)
    state = {"a": torch.randn(1000, 333), "b": torch.randn(77).bfloat16(), "c": torch.randn(2048, 1023).bfloat16()}
    before = set(shared_arenas())
    ckpt = distckpt.Checkpointer(str(tmp_path), {"s": state}, async_save=True)
    for step in (1, 2):
        for t in state.values():
            t.add_(1)
        ckpt.save(step).wait()
        items, starts = _items(_url(ckpt, step))
        staged = [a.buf.numpy().tobytes() for aid, a in shared_arenas().items() if aid not in before]
        for key in ("a", "c"):
            t = state[key]
            head, _ = frame(t.dtype, tuple(t.shape))
            data = items[f"s.{key}"][len(head) : len(head) + t.nbytes]
            assert data == t.view(-1).view(torch.uint8).numpy().tobytes()
            at = [pool.find(data) for pool in staged if data in pool]  # where the save staged it
            assert at and (starts[f"s.{key}"] + len(head)) % 4096 == at[0] % 4096
        back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
        dcp.load(back, checkpoint_id=_url(ckpt, step))
        assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    reader = distckpt.Checkpointer(str(tmp_path), back, read_only=True)
    assert reader.restore(verify=True).step == 2
    assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    ckpt.close()
    reader.close()


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
    assert "write_child.py" in _cmdline(child)
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


@pytest.mark.parametrize("direct_io", ["1", "0"])
def test_a_synchronous_save_places_big_items_at_their_live_address_and_restores(direct_io, tmp_path, monkeypatch):
    """A synchronous save writes the live tensors (no staging) from threads of the training
    process, with O_DIRECT or (DISTCKPT_DIRECT_IO=0) through the page cache; either way each
    big item's data lands at a file offset congruent to the tensor's address modulo 4 KB."""
    monkeypatch.setenv("DISTCKPT_DIRECT_IO", direct_io)
    torch.manual_seed(2)
    state = {"a": torch.randn(700, 777), "b": torch.randn(10), "c": torch.randn(4096, 300).bfloat16()}
    ckpt = distckpt.Checkpointer(str(tmp_path), {"s": state}, async_save=False)
    for step in (1, 2):  # through dcp.save, then from the plan cache
        ckpt.save(step).wait()
        items, starts = _items(_url(ckpt, step))
        for key in ("a", "c"):
            head, _ = frame(state[key].dtype, tuple(state[key].shape))
            assert (starts[f"s.{key}"] + len(head)) % 4096 == state[key].data_ptr() % 4096
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    dcp.load(back, checkpoint_id=_url(ckpt, 2))
    assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    back = {"s": {k: torch.zeros_like(v) for k, v in state.items()}}
    assert distckpt.Checkpointer(str(tmp_path), back, read_only=True).restore(verify=True).step == 2
    assert all(torch.equal(back["s"][k], v) for k, v in state.items())
    ckpt.close()


def test_the_writer_process_outlives_preemption_signals_so_the_final_save_is_written(tmp_path):
    """SLURM signals every process of the job; the parent turns the signal into a final
    save, which the writer process must still be alive to write."""
    state = _state()
    ckpt = distckpt.Checkpointer(str(tmp_path), {"s": state}, async_save=True)
    ckpt.save(1).wait()
    pid = WRITER.pid
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        os.kill(pid, sig)
    time.sleep(0.2)
    ckpt.save(2).wait()
    assert WRITER.pid == pid
    ckpt.close()
