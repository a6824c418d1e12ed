"""The cycle collector is paused while a step's description is built or read
(``distckpt/gc_paused.py``), and always handed back as it was found."""

import gc
import threading

import torch

import distckpt
from distckpt.gc_paused import gc_paused, gc_resumed


def test_paused_inside_restored_after_also_on_error():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_resumed():
            assert gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with gc_paused():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.isenabled()


def test_a_collector_the_user_disabled_stays_disabled():
    gc.disable()
    try:
        with gc_paused():
            with gc_resumed():
                assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_phases_on_two_threads_enable_it_once_both_end():
    inside, leave = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread's phase is still running
    leave.set()
    t.join()
    assert gc.isenabled()


def test_saves_and_restores_leave_the_collector_on(tmp_path):
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(50)}
    for async_save in (False, True):
        root = str(tmp_path / f"a{async_save}")
        with distckpt.Checkpointer(root, {"s": state}, async_save=async_save) as ckpt:
            ckpt.save(1).wait()
            ckpt.save(2).wait()
        target = {k: torch.zeros(4) for k in state}
        with distckpt.Checkpointer(root, {"s": target}) as ckpt:
            assert ckpt.restore().step == 2
        assert gc.isenabled() and all(torch.equal(target[k], state[k]) for k in state)
