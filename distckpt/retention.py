"""What to keep: the one-method ``RetentionPolicy``, composable built-ins, and ``Keep``.

A policy only says what it would keep: ``should_preserve(checkpoints) -> list[bool]``, one
flag per committed checkpoint, given oldest first. Policies compose: ``KeepAny(a, b)`` (or
``a | b``) keeps what either keeps, ``KeepAll(a, b)`` (``a & b``) what both keep, and
``Among(predicate, policy)`` applies ``policy`` to the checkpoints ``predicate`` selects and
leaves the others alone. ``Keep(last=, best=, metric=, every_steps=)`` is the short form of
``KeepLast | KeepBest | KeepEverySteps``.

``preserved`` adds what every deletion obeys whatever the policy says: the newest committed
step, milestones (``meta={"keep": True}``), and steps a caller protects (still uploading).
``apply`` deletes the rest. Retention runs on the tier's owner after a commit, never before
(``distckpt gc`` plans with the same ``preserved``); a failed delete is logged and retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .layout.catalog import Catalog, CheckpointInfo, metric_value
from .layout.pointer import Pointers
from .log import log

MILESTONE = "keep"  #: ``meta={"keep": True}`` marks a checkpoint that retention never deletes


@runtime_checkable
class RetentionPolicy(Protocol):
    """``should_preserve(checkpoints)``: one bool per checkpoint (given oldest first).

    Called on the tier's owner after each commit (and by ``Checkpointer.delete`` and
    ``distckpt gc``) with every committed checkpoint of the tier; it must not touch storage.
    """

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]: ...


class Policy:
    """Base of the built-in policies: ``|`` and ``&`` compose, ``label`` names the rule in
    ``distckpt ls``."""

    label = "policy"

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        raise NotImplementedError

    def __or__(self, other: RetentionPolicy) -> KeepAny:
        return KeepAny(self, other)

    def __and__(self, other: RetentionPolicy) -> KeepAll:
        return KeepAll(self, other)


def _positive(name: str, value: Any, kind: type | tuple[type, ...] = (int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {'int' if kind is int else 'number'}, got {value!r}")


@dataclass(frozen=True)
class KeepLast(Policy):
    """The newest ``n`` checkpoints."""

    n: int
    label = "last"

    def __post_init__(self) -> None:
        _positive("KeepLast(n)", self.n, int)

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        newest = set(sorted(range(len(checkpoints)), key=lambda i: checkpoints[i].step)[-self.n :])
        return [i in newest for i in range(len(checkpoints))]


@dataclass(frozen=True)
class KeepBest(Policy):
    """The best ``k`` by ``meta[metric]`` (``mode`` "min" or "max"), or by ``key(info)`` (a
    number, higher is better: SpeechBrain's ``importance_key``). Checkpoints without the
    metric (or with NaN) never count as best; ties go to the newer checkpoint."""

    k: int = 1
    metric: str | None = None
    mode: str = "min"
    key: Callable[[CheckpointInfo], Any] | None = field(default=None, compare=False)
    label = "best"

    def __post_init__(self) -> None:
        _positive("KeepBest(k)", self.k, int)
        if (self.metric is None) == (self.key is None):
            raise ValueError("KeepBest needs exactly one of metric='<meta key>' or key=callable")
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest(mode=...) must be 'min' or 'max', got {self.mode!r}")

    def score(self, info: CheckpointInfo) -> float | None:
        """Higher is better; None when ``info`` cannot be ranked."""
        if self.key is not None:
            return metric_value(self.key(info))
        value = metric_value(info.meta.get(self.metric))  # type: ignore[arg-type]
        return None if value is None else (-value if self.mode == "min" else value)

    def rank(self, checkpoints: Sequence[CheckpointInfo]) -> list[int]:
        """Indices of the rankable checkpoints, best first."""
        scored = [(s, c.step, i) for i, c in enumerate(checkpoints) if (s := self.score(c)) is not None]
        return [i for _, _, i in sorted(scored, reverse=True)]

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        best = set(self.rank(checkpoints)[: self.k])
        return [i in best for i in range(len(checkpoints))]


@dataclass(frozen=True)
class KeepEverySteps(Policy):
    """Every step divisible by ``n`` (milestones such as ``model_<step>``)."""

    n: int
    label = "every_steps"

    def __post_init__(self) -> None:
        _positive("KeepEverySteps(n)", self.n, int)

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        return [c.step % self.n == 0 for c in checkpoints]


@dataclass(frozen=True)
class KeepEvery(Policy):
    """One checkpoint per ``seconds`` of wall-clock time, by the time each was saved
    (TensorFlow's ``keep_checkpoint_every_n_hours``): the oldest is kept, then each one
    saved at least ``seconds`` after the last one kept."""

    seconds: float
    label = "every_interval"

    def __post_init__(self) -> None:
        _positive("KeepEvery(seconds)", self.seconds)

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        keep, last = [False] * len(checkpoints), None
        for i in sorted(range(len(checkpoints)), key=lambda i: checkpoints[i].step):
            if last is None or checkpoints[i].time - last >= self.seconds:
                keep[i], last = True, checkpoints[i].time
        return keep


@dataclass(frozen=True)
class KeepNewerThan(Policy):
    """Every checkpoint saved less than ``seconds`` ago (``clock`` is injectable)."""

    seconds: float
    clock: Callable[[], float] = field(default=time.time, compare=False)
    label = "recent"

    def __post_init__(self) -> None:
        _positive("KeepNewerThan(seconds)", self.seconds)

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        now = self.clock()
        return [now - c.time < self.seconds for c in checkpoints]


@dataclass(frozen=True)
class KeepIf(Policy):
    """Every checkpoint for which ``predicate(info)`` is true."""

    predicate: Callable[[CheckpointInfo], bool]
    label = "predicate"

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        return [bool(self.predicate(c)) for c in checkpoints]


class KeepAny(Policy):
    """What any of ``policies`` keeps (Orbax's ``AnyPreservationPolicy``)."""

    label = "any"

    def __init__(self, *policies: RetentionPolicy) -> None:
        if not policies:
            raise ValueError("KeepAny needs at least one policy")
        self.policies = tuple(as_policy(p) for p in policies)

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        flags = [p.should_preserve(checkpoints) for p in self.policies]
        return [any(f[i] for f in flags) for i in range(len(checkpoints))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.policies!r}"


class KeepAll(KeepAny):
    """What every one of ``policies`` keeps."""

    label = "all"

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        flags = [p.should_preserve(checkpoints) for p in self.policies]
        return [all(f[i] for f in flags) for i in range(len(checkpoints))]


@dataclass(frozen=True)
class Among(Policy):
    """Apply ``policy`` to the checkpoints ``predicate`` selects; keep all the others
    (SpeechBrain's ``delete_checkpoints(num_to_keep, ckpt_predicate=...)``)."""

    predicate: Callable[[CheckpointInfo], bool]
    policy: RetentionPolicy
    label = "among"

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        chosen = [i for i, c in enumerate(checkpoints) if self.predicate(c)]
        flags = as_policy(self.policy).should_preserve([checkpoints[i] for i in chosen])
        keep = [True] * len(checkpoints)
        for i, kept in zip(chosen, flags, strict=True):
            keep[i] = bool(kept)
        return keep


@dataclass(frozen=True, kw_only=True)
class Keep(Policy):
    """The short form: keep the union of the newest ``last``, the ``best`` by
    ``meta[metric]`` (``best_mode`` "min" or "max") and every step divisible by
    ``every_steps``. ``Keep()`` keeps everything; like every policy, it never loses the
    newest checkpoint or a milestone."""

    last: int | None = None
    best: int | None = None
    metric: str | None = None
    best_mode: str = "min"
    every_steps: int | None = None
    label = "keep"

    def __post_init__(self) -> None:
        for name in ("last", "best", "every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Keep({name}=...) must be a positive int or None, got {value!r}")
        if self.best is not None and not self.metric:
            raise ValueError("Keep(best=K) needs metric='<meta key>' to rank checkpoints by")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"Keep(best_mode=...) must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def keeps_all(self) -> bool:
        return self.last is None and self.best is None and self.every_steps is None

    def parts(self) -> list[Policy]:
        """The composable policies this is the short form of."""
        out: list[Policy] = []
        if self.last is not None:
            out.append(KeepLast(self.last))
        if self.best is not None:
            out.append(KeepBest(self.best, metric=self.metric, mode=self.best_mode))
        if self.every_steps is not None:
            out.append(KeepEverySteps(self.every_steps))
        return out

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        if self.keeps_all:
            return [True] * len(checkpoints)
        return KeepAny(*self.parts()).should_preserve(checkpoints)


def is_milestone(info: CheckpointInfo) -> bool:
    return info.meta.get(MILESTONE) is True


def preserved(
    policy: RetentionPolicy, infos: Sequence[CheckpointInfo], protect: Callable[[int], bool] = lambda s: False
) -> list[bool]:
    """``policy``'s choice plus the rule every deletion obeys: the newest committed step,
    milestones and the steps ``protect`` names are kept whatever the policy says."""
    if not infos:
        return []
    flags = policy.should_preserve(infos)
    if len(flags) != len(infos):
        raise ValueError(f"{policy!r}.should_preserve returned {len(flags)} flags for {len(infos)} checkpoints")
    newest = max(c.step for c in infos)
    return [
        bool(f) or c.step == newest or is_milestone(c) or protect(c.step) for c, f in zip(infos, flags, strict=True)
    ]


def kept_by(policy: RetentionPolicy, infos: Sequence[CheckpointInfo]) -> list[list[str]]:
    """For each checkpoint, the names of the rules that keep it (``[]``: it would be
    deleted): the leaves of ``KeepAny``/``Keep``, "newest", "milestone", and "not selected"
    for what an ``Among`` leaves alone."""
    out = _reasons(as_policy(policy), infos)
    newest = max((c.step for c in infos), default=None)
    for names, c in zip(out, infos, strict=True):
        names += ["newest"] * (c.step == newest) + ["milestone"] * is_milestone(c)
    return [list(dict.fromkeys(names)) for names in out]


def _reasons(policy: RetentionPolicy, infos: Sequence[CheckpointInfo]) -> list[list[str]]:
    if isinstance(policy, Among):
        chosen = [i for i, c in enumerate(infos) if policy.predicate(c)]
        out = [["not selected"] for _ in infos]
        for i, names in zip(chosen, _reasons(as_policy(policy.policy), [infos[i] for i in chosen]), strict=True):
            out[i] = names
        return out
    leaves = _leaves(policy)
    flags = [p.should_preserve(infos) for p in leaves]
    return [
        [getattr(p, "label", type(p).__name__) for p, f in zip(leaves, flags, strict=True) if f[i]]
        for i in range(len(infos))
    ]


def _leaves(policy: RetentionPolicy) -> list[RetentionPolicy]:
    if isinstance(policy, Keep):
        return [policy] if policy.keeps_all else [q for p in policy.parts() for q in _leaves(p)]
    if type(policy) is KeepAny:
        return [q for p in policy.policies for q in _leaves(p)]
    return [policy]


def apply(
    policy: RetentionPolicy,
    catalog: Catalog,
    protect: Callable[[int], bool] = lambda s: False,
    pointers: Pointers | None = None,
    recycle: bool = False,
) -> list[int]:
    """(the tier's owner, after a commit) Delete what ``preserved`` does not keep, then bring
    ``pointers`` (``latest.json``/``best.json``) up to date; returns the deleted steps.
    ``recycle``: the next save writes over the deleted data files (``layout/recycle.py``)."""
    infos = catalog.list()
    doomed = [c.step for c, kept in zip(infos, preserved(policy, infos, protect), strict=True) if not kept]
    deleted, failed = catalog.delete(doomed, recycle)
    for step, e in failed.items():
        log.warning("retention could not delete step %d (%s); will retry after the next save", step, e)
    if deleted:
        log.info("retention deleted steps %s", deleted)
    if pointers is not None:
        pointers.update([c for c in infos if c.step not in set(deleted)])
    return deleted


def best_ranking(best: Any, policy: RetentionPolicy) -> KeepBest | None:
    """What ``best.json`` points at: ``best`` (a meta key, minimised, or a ``KeepBest``), else
    the first best-K rule inside ``policy``, else nothing."""
    if isinstance(best, str):
        return KeepBest(1, metric=best)
    if isinstance(best, KeepBest):
        return best
    if best is not None:
        raise TypeError(f"best= needs a meta key or a distckpt.KeepBest, got {best!r}")
    return next((p for p in _leaves(as_policy(policy)) if isinstance(p, KeepBest)), None)


def as_policy(keep: Any) -> RetentionPolicy:
    if keep is None:
        return Keep()
    if isinstance(keep, RetentionPolicy):
        return keep
    raise TypeError(f"keep= needs a distckpt.Keep or an object with should_preserve(), got {keep!r}")
