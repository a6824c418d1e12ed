import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distckpt
from distckpt import CheckpointInfo, Keep
from distckpt.retention import preserved

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
