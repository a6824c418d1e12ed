"""The ``RetentionPolicy`` contract, for every policy distckpt ships and a user-written one:
one flag per checkpoint, no side effects, the same answer for the same history; and what
every deletion obeys on top (``preserved``): the newest committed step, and any step that is
protected (still uploading), survive whatever the policy says."""

from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt import (
    Among,
    CheckpointInfo,
    Keep,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepEverySteps,
    KeepIf,
    KeepLast,
    KeepNewerThan,
)
from distckpt.retention import RetentionPolicy, preserved


class DropAll:
    def should_preserve(self, checkpoints):
        return [False] * len(checkpoints)


POLICIES = [
    Keep(),
    Keep(last=1),
    Keep(last=3, every_steps=100),
    Keep(best=2, metric="loss"),
    Keep(best=1, metric="loss", best_mode="max", last=2),
    KeepLast(2) | KeepBest(1, key=lambda c: -c.step),
    KeepAll(KeepEverySteps(3), KeepIf(lambda c: c.meta["loss"] < 5)),
    KeepEvery(100.0),
    KeepNewerThan(300.0, clock=lambda: 1000.0),
    Among(lambda c: c.step % 2 == 0, KeepLast(1)),
    DropAll(),
]


@st.composite
def histories(draw):
    steps = sorted(draw(st.sets(st.integers(0, 1000), min_size=0, max_size=20)))
    losses = draw(st.lists(st.floats(0, 10), min_size=len(steps), max_size=len(steps)))
    return [
        CheckpointInfo(step=s, url=f"x/{s}", time=float(s), meta={"loss": v, **({"keep": True} if s % 97 == 0 else {})})
        for s, v in zip(steps, losses, strict=True)
    ]


@settings(max_examples=100, deadline=None)
@given(histories(), st.sampled_from(POLICIES), st.sets(st.integers(0, 1000)))
def test_policy_answers_one_flag_per_checkpoint_without_side_effects(history, policy, protected):
    assert isinstance(policy, RetentionPolicy)
    before = [(c.step, dict(c.meta)) for c in history]
    flags = policy.should_preserve(history)
    assert len(flags) == len(history) and all(isinstance(f, bool) for f in flags)
    assert policy.should_preserve(history) == flags  # deterministic
    assert [(c.step, c.meta) for c in history] == before  # the history is not touched
    kept = preserved(policy, history, protect=lambda s: s in protected)
    if history:
        newest = max(c.step for c in history)
        assert all(k for c, k in zip(history, kept, strict=True) if c.step == newest or c.step in protected)
        assert all(k for c, k in zip(history, kept, strict=True) if c.meta.get("keep") is True)  # milestones
    assert all(k for f, k in zip(flags, kept, strict=True) if f)  # preserved only ever adds
