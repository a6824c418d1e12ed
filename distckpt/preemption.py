"""Preemption: turn SIGTERM/SIGUSR1 into an agreed stop, a final save and a restart.

Who calls what, in which order (every rank runs the same code):

1. ``Checkpointer(..., preemption=True)`` (main thread) installs the handlers of
   ``Preemption.signals``. A handler only counts the signal and notes when the first one
   came: no I/O, no locks, no collectives (it runs between two bytecodes of whatever the
   main thread was doing, possibly inside a collective).
2. Once per step, ``ckpt.should_stop(step)``: every ``check_every`` steps one tiny all-reduce
   (MAX of the local flags) on the Checkpointer's private gloo group, so every rank sees
   ``True`` at the same step even when the signal reached one rank only. After the first
   ``True`` it stays ``True`` without further collectives.
3. ``ckpt.save_and_exit(step)``: waits for an in-flight async save, saves ``step`` and waits
   for its commit (unless that step is already committed), closes the Checkpointer, then
   ``exit_for_restart``: under SLURM (``SLURM_JOB_ID`` set) the chief runs
   ``scontrol requeue $SLURM_JOB_ID``; every rank exits with ``Preemption.exit_code``
   (75, ``EX_TEMPFAIL``), which torchrun turns into a restart while ``--max-restarts`` allows.
   Signals that arrive meanwhile only bump the counter: the final save is never interrupted.
4. The restarted job's ``ckpt.restore()`` picks the newest committed step on every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .log import log
from .ranks import Ranks

#: ``EX_TEMPFAIL`` from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75

_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


@dataclass
class _SignalState:
    """What the handlers record (mutated only by the handler and ``request``)."""

    count: int = 0
    first_signum: int | None = None
    first_wall: float | None = None  # time.time(), comparable across processes and logs
    first_mono: float | None = None
    previous: dict[int, Any] = field(default_factory=dict)  # signum -> handler we replaced
    stop_step: int | None = None  # the step at which the ranks agreed to stop
    stop_mono: float | None = None


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: it carries its handlers' state
class Preemption:
    """Preemption handling for a ``Checkpointer`` (``Checkpointer(..., preemption=Preemption())``).

    ``signals``: the signals that request a stop (SLURM sends SIGTERM at the end and
    ``--signal=[B:]USR1@<lead>`` ahead of a time limit or preemption). ``check_every``:
    ``should_stop`` votes every this many steps (each vote is one 4-byte all-reduce on gloo;
    the stop then comes at most ``check_every - 1`` steps later). ``exit_code``: what
    ``save_and_exit`` exits with (non-zero, so torchrun restarts the workers). ``requeue``:
    under SLURM, have the chief run ``scontrol requeue $SLURM_JOB_ID`` before exiting.

    The object also carries the handlers' state: ``requested``, ``count``, ``signal_time``.
    ``install()``/``uninstall()`` are called for you by the Checkpointer, from the main thread.
    """

    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
    check_every: int = 1
    exit_code: int = EXIT_PREEMPTED
    requeue: bool = True
    _state: _SignalState = field(default_factory=_SignalState, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sigs = (self.signals,) if isinstance(self.signals, int) else tuple(self.signals)
        if not sigs:
            raise ValueError("Preemption.signals is empty; give at least one, e.g. (signal.SIGTERM,)")
        try:
            sigs = tuple(signal.Signals(s) for s in sigs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Preemption.signals must be signal numbers like signal.SIGUSR1: {e}") from None
        if bad := [s.name for s in sigs if s in _UNCATCHABLE]:
            raise ValueError(f"{', '.join(bad)} cannot be caught; use SIGTERM or SIGUSR1 (sbatch --signal=B:USR1@120)")
        object.__setattr__(self, "signals", tuple(dict.fromkeys(sigs)))
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"Preemption.check_every must be an int >= 1, got {self.check_every!r}")
        if isinstance(self.exit_code, bool) or not isinstance(self.exit_code, int) or not 1 <= self.exit_code <= 255:
            raise ValueError(
                f"Preemption.exit_code must be in 1..255 (0 would tell torchrun the job is done), got {self.exit_code!r}"
            )

    # --- handlers -------------------------------------------------------------------

    def install(self) -> Preemption:
        """Install the handlers (main thread only; idempotent). Returns ``self``."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "signal handlers can only be installed from the main thread; create the Checkpointer "
                "with preemption=... there, or pass preemption=None"
            )
        for sig in self.signals:
            if sig not in self._state.previous:
                self._state.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that ``install`` replaced (main thread only)."""
        for sig, previous in list(self._state.previous.items()):
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            del self._state.previous[sig]

    @property
    def installed(self) -> bool:
        return bool(self._state.previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Signal handler: record and return. No I/O, no logging, no locks, no collectives:
        # it may run inside a collective or a save, which must go on undisturbed.
        self.request(signum)

    def request(self, signum: int | None = None) -> None:
        """Ask for a stop as a signal would (e.g. a time budget, or a signal caught before
        the handlers were installed). This rank only; ``should_stop`` spreads it."""
        st = self._state
        st.count += 1
        if st.first_mono is None:
            st.first_signum, st.first_wall, st.first_mono = signum, time.time(), time.monotonic()

    # --- what happened --------------------------------------------------------------

    @property
    def requested(self) -> bool:
        """A stop was requested on this rank (signal or ``request``)."""
        return self._state.count > 0

    @property
    def count(self) -> int:
        """How many signals (and requests) this rank has seen."""
        return self._state.count

    @property
    def signal_time(self) -> float | None:
        """``time.time()`` of the first signal on this rank, or ``None``."""
        return self._state.first_wall

    @property
    def stop_step(self) -> int | None:
        """The step at which ``should_stop`` first returned True, or ``None``."""
        return self._state.stop_step

    # --- used by the Checkpointer ---------------------------------------------------

    def vote(self, ranks: Ranks, step: int) -> bool:
        """(all ranks, same steps) ``Checkpointer.should_stop``'s agreement; see the module doc."""
        st = self._state
        if st.stop_step is not None:
            return True
        if step % self.check_every:
            return False
        if not ranks.any_true(self.requested):
            return False
        st.stop_step, st.stop_mono = step, time.monotonic()
        if self.requested:
            name = signal.Signals(st.first_signum).name if st.first_signum else "a request"
            ago = st.stop_mono - (st.first_mono or st.stop_mono)
            log.warning("preemption: %s arrived %.2fs ago; all ranks stop at step %d", name, ago, step)
        else:
            log.warning("preemption: another rank was signalled; all ranks stop at step %d", step)
        return True

    def report_committed(self, step: int, save_s: float, saved: bool) -> None:
        """Log the figure that sizes ``--signal=B:USR1@<lead>``: signal to committed final save."""
        st = self._state
        start = st.first_mono if st.first_mono is not None else st.stop_mono
        since = time.monotonic() - start if start is not None else float("nan")
        what = (
            f"final save of step {step} committed in {save_s:.2f}s" if saved else f"step {step} was already committed"
        )
        log.warning("preemption: %s; %.2fs from the signal to the committed final save", what, since)


def as_preemption(value: Any) -> Preemption | None:
    """The ``Checkpointer(preemption=...)`` option: ``None``/``False``, ``True`` or a ``Preemption``."""
    if value is None or value is False:
        return None
    if value is True:
        return Preemption()
    if isinstance(value, Preemption):
        return value
    raise TypeError(f"preemption must be None, True or a distckpt.Preemption, got {type(value).__name__}")


def under_slurm() -> str | None:
    """This process's SLURM job id, when it runs inside a SLURM job."""
    return os.environ.get("SLURM_JOB_ID") or None


def save_and_exit(
    preemption: Preemption,
    ranks: Ranks,
    step: int,
    final_save: Callable[[], tuple[bool, bool]],
    close: Callable[[], None],
) -> NoReturn:
    """``Checkpointer.save_and_exit`` (all ranks): final save, report, close, requeue, exit.

    ``final_save()`` waits for saves in flight and saves ``step`` unless it is committed
    already, returning ``(saved, already_committed)`` (``Saves.final_save``; a failure is
    logged there, not raised); ``close()`` closes the Checkpointer. Then the time from the
    first signal to the commit is logged and ``exit_for_restart`` requeues and exits. The
    handlers stay installed throughout, so another signal only bumps the counter.
    """
    t0 = time.perf_counter()
    saved, done = final_save()
    if saved or done:
        preemption.report_committed(step, time.perf_counter() - t0, saved)
    close()
    exit_for_restart(preemption, ranks)


def exit_for_restart(preemption: Preemption, ranks: Ranks) -> NoReturn:
    """(all ranks, after the final save committed) requeue under SLURM, then exit.

    The chief requeues first and the other ranks wait for it in a barrier: a rank that exited
    early could make ``srun --kill-on-bad-exit`` kill the chief before it requeued. Requeueing
    makes SLURM terminate the job (SIGTERM, which only bumps the counter, then SIGKILL after
    ``KillWait``); the commit is already durable, so being killed from here on loses nothing.
    """
    job = under_slurm()
    if job and preemption.requeue and ranks.is_chief:
        _scontrol_requeue(job)
    ranks.barrier()
    log.info("preemption: exiting with code %d for a restart", preemption.exit_code)
    raise SystemExit(preemption.exit_code)


def _scontrol_requeue(job: str) -> None:
    cmd = ["scontrol", "requeue", job]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("preemption: %s failed (%s); resubmit the job to resume from the final save", " ".join(cmd), e)
        return
    if proc.returncode != 0:
        log.error(
            "preemption: %s failed (exit %d: %s); submit the job with --requeue, or resubmit it to resume",
            " ".join(cmd),
            proc.returncode,
            (proc.stderr or proc.stdout).strip(),
        )
    else:
        log.warning("preemption: requeued SLURM job %s", job)
