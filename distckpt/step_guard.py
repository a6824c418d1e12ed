"""Overlapped snapshots (``snapshot="overlap"``): what only an optimizer changes is copied
beside the next step's forward and backward, and every optimizer's step waits for the copy.

A save captures the state as it is when ``save()`` is called; by default the whole staging
copy blocks training. But from one optimizer step to the next nothing changes a model's
parameters or an optimizer's state: the forward and backward only read them. So with
``snapshot="overlap"`` ``save()`` copies the rest at once (buffers such as BatchNorm's
running statistics, which the forward does change; schedulers; tensors of other
recoverables), starts the copy of the optimizers' parameters and state on a background
thread, and returns. A pre-hook on every optimizer's step
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) waits until that copy is done
before the step changes anything. When the forward and backward take longer than the copy,
training does not wait for it; the first save after the Checkpointer is built, whose pool
pages are still being faulted in, is hidden the same way. The copy can still slow the
forward and backward where they share the memory with it: on the 2-core CPU test machine
the training time lost per save did not fall measurably, the stall did (0.005 s against
0.036-0.040 s for 0.5 GB; see ``benchmarks/README.md``). (CheckFreq, FAST '21, pipelines its
snapshot with the next iteration on the same ground.)

What the caller promises: between ``save()`` and the next optimizer step nothing else
changes parameters or optimizer state in place (``p.data.copy_(...)``,
``load_state_dict``, averaging weights into the live model). The hook is global: every
optimizer in the process waits for a pending copy, also ones distckpt does not save.

Which tensors may wait is found by storage: a tensor of the save whose storage is that of a
parameter or state tensor of an optimizer among the recoverables. Anything else (a gathered
or offloaded copy, a buffer, a tensor of a plain dict) is copied at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import wait
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .arena import local_part
from .copies import start_snapshot_thread
from .log import log
from .staging import HostStaged

SNAPSHOTS = ("now", "overlap")


class StepGuard:
    """Holds every optimizer step until the pending deferred copy is done.

    ``optimizers()`` is asked at each save (recoverables may be added later). Call order:
    ``later(tensors)`` then ``hold(ready)`` in ``save()`` on the training thread; the hook
    on any thread that steps an optimizer; ``close()`` once, after the last save."""

    def __init__(self, optimizers: Callable[[], Iterable[torch.optim.Optimizer]]) -> None:
        self._optimizers = optimizers
        self._pending: HostStaged | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._hook = register_optimizer_step_pre_hook(self._before_step)
        start_snapshot_thread()

    def later(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Names of ``tensors`` that only an optimizer's step changes: their copy may follow."""
        storages = set()
        for optim in self._optimizers():
            for group in optim.param_groups:
                storages.update(_storage(p) for p in group["params"])
            for state in optim.state.values():
                storages.update(_storage(v) for v in state.values() if isinstance(v, torch.Tensor))
        storages.discard(0)  # empty and meta tensors have no storage to share
        names = {name for name, t in tensors.items() if _storage(t) in storages}
        if not names and not self._warned:
            self._warned = True
            log.warning(
                "snapshot='overlap' found no tensor of an optimizer among the recoverables: saves copy "
                "everything before they return (pass the optimizer to the Checkpointer)"
            )
        return names

    def hold(self, staged: HostStaged) -> None:
        """The copy into ``staged`` (``staged.ready``) must be done before any optimizer steps;
        the time steps wait for it is added to ``staged.held``."""
        with self._lock:
            self._pending = staged

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with self._lock:
            staged = self._pending
        if staged is None or staged.ready is None or staged.ready.done():
            return
        t0 = time.perf_counter()
        wait([staged.ready])  # never raises: a failed copy fails its save, not the training step
        staged.held += time.perf_counter() - t0

    def close(self) -> None:
        """After the last save: wait for its copy, take the hook off."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending.ready is not None:
            wait([pending.ready])
        self._hook.remove()


def _storage(t: torch.Tensor) -> int:
    part = local_part(t)
    if part.is_meta:
        return 0
    return part.untyped_storage().data_ptr()
