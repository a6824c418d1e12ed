"""When to save: the one-method ``SavePolicy``, built-in schedules, and the collective decision.

A policy answers ``should_save(ctx) -> bool`` from a ``SaveContext`` (the step, the clock,
the last save, whether one is still in flight, whether a preemption stop was agreed). It
keeps no state of its own, so one policy object can serve several jobs. Policies compose
with ``SaveAny(a, b)`` or ``a | b``.

Every rank must get the same answer, or the ranks would disagree about entering a save's
collectives. Step-based policies answer the same everywhere by construction and cost
nothing; a policy that reads the clock (``uses_clock``) is evaluated on the chief alone and
its answer all-gathered (one small collective per ``should_save``), because clocks on
different hosts differ. Time-based built-ins take a ``clock`` (``time.monotonic`` by
default; inject another in tests or simulations).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .ranks import Ranks

Clock = Callable[[], float]


@dataclass(frozen=True)
class SaveContext:
    """What a policy decides from (times are in the policy's clock, seconds)."""

    step: int
    now: float
    started: float  #: when this job first asked (the start of training, for this process)
    last_step: int | None = None  #: the newest step this job saved or restored
    last_time: float | None = None  #: when this process last started a save
    busy: bool = False  #: a save (or its upload) is still in flight: not yet durable
    preempted: bool = False  #: the ranks agreed to stop (``should_stop`` returned True)


@runtime_checkable
class SavePolicy(Protocol):
    """``should_save(ctx)``: whether to save at ``ctx.step``. ``uses_clock``: the answer
    depends on the time, so the chief decides for every rank."""

    uses_clock: bool

    def should_save(self, ctx: SaveContext) -> bool: ...


class Schedule:
    """Base of the built-in policies: ``|`` composes."""

    uses_clock = False
    clock: Clock = staticmethod(time.monotonic)  # type: ignore[assignment]

    def should_save(self, ctx: SaveContext) -> bool:
        raise NotImplementedError

    def __or__(self, other: SavePolicy) -> SaveAny:
        return SaveAny(self, other)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class SaveEverySteps(Schedule):
    """Every ``n`` steps (steps divisible by ``n``)."""

    n: int

    def __post_init__(self) -> None:
        _positive("SaveEverySteps(n)", self.n)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0


@dataclass(frozen=True)
class SaveEverySeconds(Schedule):
    """Once ``seconds`` have passed since the last save (or since training started)."""

    seconds: float
    clock: Clock = field(default=time.monotonic, compare=False)
    uses_clock = True

    def __post_init__(self) -> None:
        _positive("SaveEverySeconds(seconds)", self.seconds)

    def should_save(self, ctx: SaveContext) -> bool:
        since = ctx.last_time if ctx.last_time is not None else ctx.started
        return ctx.now - since >= self.seconds


@dataclass(frozen=True)
class SaveContinuously(Schedule):
    """As soon as the previous save is durable, but at most once per ``min_interval``
    seconds (Orbax's ``ContinuousCheckpointingPolicy``): the newest state is always being
    saved, and never more than one save is in flight."""

    min_interval: float = 0.0
    clock: Clock = field(default=time.monotonic, compare=False)
    uses_clock = True

    def should_save(self, ctx: SaveContext) -> bool:
        if ctx.busy:
            return False
        return ctx.last_time is None or ctx.now - ctx.last_time >= self.min_interval


@dataclass(frozen=True)
class SaveDenseEarly(Schedule):
    """Dense early, sparse later: ``phases`` are ``(until_step, every)`` pairs, in order;
    after the last phase, every ``then`` steps. GPT-SoVITS' practice (every 2 epochs for the
    first 10, then every 5 up to 50, then every 10) is
    ``SaveDenseEarly([(10, 2), (50, 5)], then=10)`` with the epoch as the step."""

    phases: Sequence[tuple[int, int]]
    then: int

    def __post_init__(self) -> None:
        for until, every in self.phases:
            _positive("SaveDenseEarly phase step", until)
            _positive("SaveDenseEarly phase interval", every)
        if list(self.phases) != sorted(self.phases):
            raise ValueError(f"SaveDenseEarly phases must be in step order, got {self.phases!r}")
        _positive("SaveDenseEarly(then)", self.then)

    def should_save(self, ctx: SaveContext) -> bool:
        every = next((e for until, e in self.phases if ctx.step <= until), self.then)
        return ctx.step % every == 0


class SaveAt(Schedule):
    """At the given steps (the last step of training, say)."""

    def __init__(self, *steps: int) -> None:
        self.steps = frozenset(int(s) for s in steps)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step in self.steps

    def __repr__(self) -> str:
        return f"SaveAt{tuple(sorted(self.steps))!r}"


class SaveInitial(Schedule):
    """As soon as possible when the job has no checkpoint yet (Orbax's ``InitialSavePolicy``)."""

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.last_step is None

    def __repr__(self) -> str:
        return "SaveInitial()"


class SaveOnPreemption(Schedule):
    """Once the ranks agreed to stop (``should_stop``); ``save_and_exit`` does the same save."""

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.preempted

    def __repr__(self) -> str:
        return "SaveOnPreemption()"


class SaveAny(Schedule):
    """Save when any of ``policies`` says so."""

    def __init__(self, *policies: SavePolicy) -> None:
        if not policies:
            raise ValueError("SaveAny needs at least one policy")
        for p in policies:
            if not isinstance(p, SavePolicy):
                raise TypeError(f"not a save policy (no should_save/uses_clock): {p!r}")
        self.policies = policies
        self.uses_clock = any(p.uses_clock for p in policies)
        clocks = [p.clock for p in policies if getattr(p, "uses_clock", False) and hasattr(p, "clock")]
        self.clock = clocks[0] if clocks else time.monotonic  # type: ignore[assignment]

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)

    def __repr__(self) -> str:
        return f"SaveAny{self.policies!r}"


class Scheduler:
    """A Checkpointer's side of its ``SavePolicy``: the context it is asked with, and the
    agreement (see the module doc). ``saved``/``restored`` keep ``last_*`` current."""

    def __init__(self, policy: SavePolicy | None, ranks: Ranks) -> None:
        self.policy, self.ranks = policy, ranks
        self.clock: Clock = getattr(policy, "clock", time.monotonic)
        self.started: float | None = None
        self.last_step: int | None = None
        self.last_time: float | None = None

    def should_save(self, step: int, busy: Callable[[], bool], preempted: bool) -> bool:
        """(all ranks, same steps) The policy's answer at ``step``, the same on every rank."""
        if self.policy is None or step == self.last_step:
            return False  # no schedule, or saved (or restored) already
        if not self.policy.uses_clock:
            return bool(self.policy.should_save(self._context(step, busy, preempted)))

        def decide() -> bool | None:
            return bool(self.policy.should_save(self._context(step, busy, preempted))) if self.ranks.is_chief else None

        return bool(self.ranks.agree(decide, f"deciding whether to save step {step}")[0])

    def _context(self, step: int, busy: Callable[[], bool], preempted: bool) -> SaveContext:
        now = self.clock()
        if self.started is None:
            self.started = now
        return SaveContext(step, now, self.started, self.last_step, self.last_time, busy(), preempted)

    def saved(self, step: int) -> None:
        self.last_step, self.last_time = step, self.clock()
        if self.started is None:
            self.started = self.last_time

    def restored(self, step: int | None) -> None:
        if step is not None:
            self.last_step = step


def as_save_policy(value: Any) -> SavePolicy | None:
    """The ``save_policy=`` option: ``None``, a policy, or an int (every that many steps)."""
    if value is None or isinstance(value, SavePolicy):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return SaveEverySteps(value)
    raise TypeError(f"save_policy= needs a distckpt save policy (e.g. SaveEverySteps(100)), got {value!r}")
