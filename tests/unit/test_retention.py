import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distckpt
from distckpt import (
    Among,
    CheckpointInfo,
    Keep,
    KeepAll,
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepEverySteps,
    KeepIf,
    KeepLast,
    KeepNewerThan,
)
from distckpt.retention import kept_by, preserved

metrics = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False, width=32))


@st.composite
def histories(draw):
    steps = sorted(draw(st.sets(st.integers(0, 10_000), min_size=0, max_size=30)))
    return [
        CheckpointInfo(step=s, url=f"x/{s}", meta={} if (m := draw(metrics)) is None else {"loss": m}) for s in steps
    ]


keeps = st.builds(
    Keep,
    last=st.one_of(st.none(), st.integers(1, 6)),
    best=st.one_of(st.none(), st.integers(1, 4)),
    metric=st.just("loss"),
    best_mode=st.sampled_from(["min", "max"]),
    every_steps=st.one_of(st.none(), st.integers(1, 500)),
)


def _value(c):
    v = c.meta.get("loss")
    return None if v is None or math.isnan(v) else v


@settings(max_examples=400, deadline=None)
@given(histories(), keeps)
def test_keep_preserves_exactly_the_union_of_its_rules_and_the_newest(history, keep):
    flags = preserved(keep, history)
    assert len(flags) == len(history)
    kept = {c.step for c, f in zip(history, flags, strict=True) if f}
    if not history:
        return
    expected = {max(c.step for c in history)}
    if keep.keeps_all:
        expected = {c.step for c in history}
    if keep.last:
        expected |= {c.step for c in sorted(history, key=lambda c: c.step)[-keep.last :]}
    if keep.every_steps:
        expected |= {c.step for c in history if c.step % keep.every_steps == 0}
    if keep.best:
        scored = [c for c in history if _value(c) is not None]
        sign = 1 if keep.best_mode == "min" else -1
        best = sorted(scored, key=lambda c: (sign * _value(c), -c.step))[: keep.best]
        expected |= {c.step for c in best}
        # what the policy dropped never beats the K-th best of what it kept
        kept_scores = sorted(sign * _value(c) for c in scored if c.step in kept)[: keep.best]
        if kept_scores:
            assert all(sign * _value(c) >= kept_scores[-1] for c in scored if c.step not in kept)
    assert kept == expected


@given(histories())
def test_keep_last_one_keeps_only_the_newest(history):
    flags = Keep(last=1).should_preserve(history)
    assert sum(flags) == min(1, len(history))
    if history:
        assert flags[[c.step for c in history].index(max(c.step for c in history))]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"last": 0}, "positive"),
        ({"best": 2}, "metric"),
        ({"best_mode": "up"}, "best_mode"),
        ({"every_steps": -1}, "positive"),
    ],
)
def test_keep_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Keep(**kwargs)


def test_retention_on_storage_keeps_last_best_and_every(root):
    model = torch.nn.Linear(2, 2)
    keep = Keep(last=2, best=1, metric="loss", every_steps=4)
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.8, 5: 0.7, 6: 0.6, 7: 0.4}
    with distckpt.Checkpointer(root, {"model": model}, keep=keep) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, meta={"loss": loss})
        assert [c.step for c in ckpt.list()] == [2, 4, 6, 7]
        # an explicit clean-up with a stricter policy never removes the newest
        assert ckpt.delete(keep=Keep(last=1)) == [2, 4, 6]
        assert [c.step for c in ckpt.list()] == [7]


class _Evens:
    def should_preserve(self, checkpoints):
        return [c.step % 2 == 0 for c in checkpoints]


def test_custom_retention_policy_is_used_and_newest_survives(root):
    with distckpt.Checkpointer(root, {"x": torch.zeros(1)}, keep=_Evens()) as ckpt:
        for step in range(1, 6):
            ckpt.save(step)
        assert [c.step for c in ckpt.list()] == [2, 4, 5]


# --- the composable policies, one by one (a history of 8 saves an hour apart) --------------

HOUR = 3600.0
LOSSES = [0.9, 0.3, 0.5, 0.2, 0.6, 0.25, 0.7, 0.4]  # steps 10, 20, ..., 80
KINDS = ["fast", "full"] * 4


def _history(extra=None):
    return [
        CheckpointInfo(step=10 * (i + 1), url="x", time=1000.0 + i * HOUR, meta={"loss": loss, "kind": KINDS[i]})
        for i, loss in enumerate(LOSSES)
    ] + list(extra or [])


def _kept(policy, history=None):
    history = history or _history()
    return [c.step for c, f in zip(history, policy.should_preserve(history), strict=True) if f]


def test_keep_last_keeps_the_newest_n():
    assert _kept(KeepLast(3)) == [60, 70, 80]


def test_keep_best_by_metric_min_max_and_by_callable():
    assert _kept(KeepBest(2, metric="loss")) == [40, 60]
    assert _kept(KeepBest(2, metric="loss", mode="max")) == [10, 70]
    per_step = KeepBest(1, key=lambda c: -c.meta["loss"] * c.step)  # SpeechBrain's importance_key
    assert _kept(per_step) == [20]


def test_keep_every_steps_and_one_per_interval():
    assert _kept(KeepEverySteps(40)) == [40, 80]
    assert _kept(KeepEvery(3 * HOUR)) == [10, 40, 70]  # the oldest, then one at least 3 h later
    assert _kept(KeepEvery(2.5 * HOUR)) == [10, 40, 70]


def test_keep_newer_than_reads_an_injected_clock():
    now = {"t": 1000.0 + 7 * HOUR}  # the time of step 80
    policy = KeepNewerThan(2.5 * HOUR, clock=lambda: now["t"])
    assert _kept(policy) == [60, 70, 80]
    now["t"] += 10 * HOUR
    assert _kept(policy) == []


def test_predicates_and_combinators():
    full = KeepIf(lambda c: c.meta["kind"] == "full")
    assert _kept(full) == [20, 40, 60, 80]
    assert _kept(KeepAny(KeepLast(1), KeepBest(1, metric="loss"))) == [40, 80]
    assert _kept(KeepLast(1) | KeepBest(1, metric="loss")) == [40, 80]
    assert _kept(KeepAll(full, KeepBest(3, metric="loss"))) == [20, 40, 60]
    assert _kept(full & KeepLast(3)) == [60, 80]


def test_among_applies_the_policy_to_a_subset_and_leaves_the_rest():
    # SpeechBrain: delete_checkpoints(num_to_keep=1, ckpt_predicate=...)
    policy = Among(lambda c: c.meta["kind"] == "fast", KeepLast(1))
    assert _kept(policy) == [20, 40, 60, 70, 80]


def test_keep_is_the_short_form_of_the_composable_policies():
    keep = Keep(last=2, best=1, metric="loss", every_steps=30)
    assert (
        _kept(keep)
        == _kept(KeepAny(KeepLast(2), KeepBest(1, metric="loss"), KeepEverySteps(30)))
        == [30, 40, 60, 70, 80]
    )


def test_milestones_and_the_newest_are_never_deleted_whatever_the_policy():
    history = _history()
    history[2] = CheckpointInfo(step=30, url="x", time=history[2].time, meta={"loss": 0.5, "keep": True})
    flags = preserved(KeepIf(lambda c: False), history)
    assert [c.step for c, f in zip(history, flags, strict=True) if f] == [30, 80]
    assert kept_by(KeepLast(1), history)[2] == ["milestone"]


def test_kept_by_names_the_rules_that_keep_each_step():
    reasons = kept_by(Keep(last=1, best=1, metric="loss"), _history())
    assert reasons[3] == ["best"] and reasons[7] == ["last", "newest"] and reasons[0] == []
    assert kept_by(Among(lambda c: c.meta["kind"] == "fast", KeepLast(1)), _history())[1] == ["not selected"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: KeepLast(0),
        lambda: KeepBest(1),
        lambda: KeepBest(1, metric="loss", key=lambda c: 1),
        lambda: KeepEvery(-1),
        lambda: KeepNewerThan(0),
        lambda: KeepAny(),
    ],
)
def test_bad_policies_are_refused_at_construction(make):
    with pytest.raises(ValueError):
        make()


def test_time_based_retention_on_storage_with_milestones(root):
    clock = {"t": 0.0}
    policy = KeepNewerThan(HOUR, clock=lambda: clock["t"])
    with distckpt.Checkpointer(root, {"x": torch.zeros(1)}, keep=policy) as ckpt:
        ckpt.save(1, meta={"keep": True})  # a milestone
        ckpt.save(2)
        clock["t"] = ckpt.list()[-1].time + 2 * HOUR  # both are now older than an hour
        ckpt.save(3)
        assert [c.step for c in ckpt.list()] == [1, 3]  # 2 expired; the milestone and the newest stay
