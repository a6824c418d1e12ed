"""Save schedules (``SavePolicy``), each on its own with a constructed context, then driven
through ``Checkpointer.maybe_save`` with an injected clock (no sleeps)."""

import pytest
import torch

import distckpt
from distckpt import (
    SaveAny,
    SaveAt,
    SaveContext,
    SaveContinuously,
    SaveDenseEarly,
    SaveEverySeconds,
    SaveEverySteps,
    SaveInitial,
    SaveOnPreemption,
    SavePolicy,
)


def ctx(step, now=0.0, **kw):
    return SaveContext(step=step, now=now, started=kw.pop("started", 0.0), **kw)


def _steps(policy, upto=60):
    return [s for s in range(1, upto + 1) if policy.should_save(ctx(s))]


def test_every_n_steps_and_at_given_steps():
    assert _steps(SaveEverySteps(25), 100) == [25, 50, 75, 100]
    assert _steps(SaveAt(7, 60)) == [7, 60]
    assert not SaveEverySteps(5).uses_clock and not SaveAt(1).uses_clock


def test_dense_early_is_the_gpt_sovits_practice():
    gpt_sovits = SaveDenseEarly([(10, 2), (50, 5)], then=10)  # epochs as steps
    assert _steps(gpt_sovits, 80) == [2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80]


def test_every_seconds_counts_from_the_last_save_or_the_start():
    policy = SaveEverySeconds(600)
    assert policy.uses_clock
    assert not policy.should_save(ctx(5, now=599.0))  # 599 s of training, nothing saved yet
    assert policy.should_save(ctx(6, now=600.0))
    assert not policy.should_save(ctx(7, now=1000.0, last_step=6, last_time=600.0))
    assert policy.should_save(ctx(8, now=1200.0, last_step=6, last_time=600.0))


def test_continuous_saves_as_soon_as_the_previous_one_is_durable_at_most_every_interval():
    policy = SaveContinuously(min_interval=30)
    assert policy.should_save(ctx(1, now=0.0))
    assert not policy.should_save(ctx(2, now=100.0, last_step=1, last_time=0.0, busy=True))  # still writing
    assert policy.should_save(ctx(3, now=100.0, last_step=1, last_time=0.0))
    assert not policy.should_save(ctx(4, now=110.0, last_step=3, last_time=100.0))  # too soon


def test_initial_save_and_on_preemption_and_any():
    assert SaveInitial().should_save(ctx(0)) and not SaveInitial().should_save(ctx(9, last_step=8))
    assert SaveOnPreemption().should_save(ctx(3, preempted=True)) and not SaveOnPreemption().should_save(ctx(3))
    combined = SaveEverySteps(10) | SaveEverySeconds(60)
    assert isinstance(combined, SaveAny) and combined.uses_clock
    assert combined.should_save(ctx(10)) and combined.should_save(ctx(3, now=61.0))
    assert not combined.should_save(ctx(3, now=30.0))


@pytest.mark.parametrize(
    "make",
    [lambda: SaveEverySteps(0), lambda: SaveEverySeconds(-1), lambda: SaveDenseEarly([(50, 5), (10, 2)], then=10)],
)
def test_bad_schedules_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_maybe_save_follows_the_schedule_with_an_injected_clock(root):
    clock = {"t": 0.0}
    schedule = SaveInitial() | SaveEverySteps(10) | SaveEverySeconds(300, clock=lambda: clock["t"])
    t = torch.zeros(3)
    saved = []
    with distckpt.Checkpointer(root, {"t": t}, save_policy=schedule) as ckpt:
        for step in range(1, 31):
            clock["t"] += 25.0 if step != 17 else 400.0  # a slow step (evaluation, say)
            t.fill_(step)
            if ckpt.maybe_save(step, meta=lambda s=step: {"loss": 1.0 / s}) is not None:  # meta only when saving
                saved.append(step)
        assert saved == [1, 10, 17, 20, 30]
        assert [c.step for c in ckpt.list()] == saved and ckpt.list()[2].meta == {"loss": 1.0 / 17}
        assert not ckpt.should_save(30)  # a step is never saved twice
    with distckpt.Checkpointer(root, {"t": t}, save_policy=SaveInitial()) as ckpt:
        assert ckpt.restore().step == 30 and not ckpt.should_save(31)  # a resumed job has a checkpoint


def test_without_a_save_policy_maybe_save_never_saves(root):
    with distckpt.Checkpointer(root, {"t": torch.zeros(1)}) as ckpt:
        assert ckpt.maybe_save(1) is None and ckpt.list() == []
    with distckpt.Checkpointer(root, {"t": torch.zeros(1)}, save_policy=5) as ckpt:  # an int: every 5 steps
        assert [s for s in range(1, 12) if ckpt.maybe_save(s)] == [5, 10]


SCHEDULES = [
    SaveEverySteps(3),
    SaveEverySeconds(10, clock=lambda: 0.0),
    SaveContinuously(5, clock=lambda: 0.0),
    SaveDenseEarly([(5, 1)], then=4),
    SaveAt(2, 9),
    SaveInitial(),
    SaveOnPreemption(),
    SaveEverySteps(4) | SaveEverySeconds(30),
]


@pytest.mark.parametrize("policy", SCHEDULES, ids=lambda p: type(p).__name__)
def test_save_policy_contract_a_pure_bool_per_context(policy):
    assert isinstance(policy, SavePolicy) and isinstance(policy.uses_clock, bool)
    contexts = [
        ctx(
            s,
            now=7.0 * s,
            last_step=s - 1 if s > 1 else None,
            last_time=7.0 * (s - 1),
            busy=s % 3 == 0,
            preempted=s == 6,
        )
        for s in range(1, 13)
    ]
    first = [policy.should_save(c) for c in contexts]
    assert all(isinstance(a, bool) for a in first)
    assert [policy.should_save(c) for c in reversed(contexts)][::-1] == first  # no state: order does not matter
