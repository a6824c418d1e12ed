"""Background threads yield the CPU to the training loop.

A background save must not slow training. Its big writes release the GIL, but its threads
still compete for CPU time with the training thread (and the data loader) on the cores they
share. Linux schedules threads individually and a thread's nice value is its own, so each
background thread of distckpt (the save thread and the writer threads it starts, the upload
and retention threads, the staging pool's reservation) lowers its own priority: when a core
is contended, training runs first; when it is idle, the save runs at full speed. Threads a
background thread starts inherit its priority. A synchronous save runs on the training
thread and keeps its priority: training waits for it anyway.
"""

from __future__ import annotations

import os
import threading

NICE = 10  #: how much lower than the training thread (0 = equal, 19 = lowest)


def yield_to_training() -> None:
    """Lower the calling thread's CPU priority by ``NICE`` (Linux; a no-op where unsupported)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: priorities stay equal
        pass
