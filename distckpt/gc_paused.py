"""Python's cycle collector paused while a step's description is built or read.

Planning a save, pickling or unpickling DCP's metadata and turning it into JSON and back
create several objects per tensor: half a million for a state of 100,000 tensors. Every
700 new objects the collector runs, and every so often it walks every object the process
holds - the model, the optimizer, the metadata being built - so that work grows with the
square of the number of tensors: measured at 100,000 tensors, unpickling DCP's metadata took
2.4 s with the collector paused and 7-13 s without. Nothing built there forms a cycle that
must be freed early, so the collector waits until the phase ends (and runs on its own
schedule afterwards). If it was already disabled, it stays so.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_holders = 0  # phases running now (the save thread and the training thread may overlap)
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()


@contextlib.contextmanager
def gc_resumed() -> Iterator[None]:
    """Within a paused phase, the collector back on for a long stretch that builds few
    objects (a save's data being written while training goes on beside it)."""
    with _lock:
        lifted = _holders > 0 and _was_enabled
        if lifted:
            gc.enable()
    try:
        yield
    finally:
        with _lock:
            if lifted and _holders > 0:
                gc.disable()
