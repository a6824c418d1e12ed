"""The retention options that ``distckpt ls`` and ``distckpt gc`` share, and the policy they build.

``--keep-last N --keep-best K --metric loss [--best-mode max] --keep-every N
--keep-every-hours H --keep-newer-than 36h --among kind=full`` build the same composable
policy a job would use (``KeepAny`` of ``KeepLast``, ``KeepBest``, ``KeepEverySteps``,
``KeepEvery``, ``KeepNewerThan``; ``Among`` for ``--among``). ``ls`` shows which rule keeps
each step; ``gc`` deletes what none keeps (never the newest step or a milestone).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from ..errors import DistckptError
from ..retention import Among, Keep, KeepAny, KeepEvery, KeepNewerThan, Policy

KeepLastOpt = Annotated[int | None, typer.Option("--keep-last", help="keep the newest N steps")]
KeepBestOpt = Annotated[int | None, typer.Option("--keep-best", help="keep the best K steps by --metric")]
MetricOpt = Annotated[str | None, typer.Option("--metric", help="meta key ranking --keep-best")]
BestModeOpt = Annotated[str, typer.Option("--best-mode", help="min or max: which --metric is best")]
KeepEveryOpt = Annotated[int | None, typer.Option("--keep-every", help="keep steps divisible by N")]
KeepHoursOpt = Annotated[
    float | None, typer.Option("--keep-every-hours", help="keep one step per H hours of saves (by save time)")
]
NewerOpt = Annotated[str | None, typer.Option("--keep-newer-than", help="keep steps saved within, e.g. 36h, 2d, 90m")]
AmongOpt = Annotated[
    list[str] | None, typer.Option("--among", help="apply the rules only to steps whose meta KEY=VALUE (repeatable)")
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``36h``, ``2d``, ``1w`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise DistckptError(f"cannot read {text!r} as a duration; write e.g. 90m, 36h or 2d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _meta_filter(pairs: list[str]) -> Any:
    wanted = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise DistckptError(f"--among needs KEY=VALUE, got {pair!r}")
        try:
            wanted[key] = json.loads(raw)
        except ValueError:
            wanted[key] = raw  # a bare word is a string
    return lambda info: all(info.meta.get(k) == v for k, v in wanted.items())


def build_policy(
    keep_last: int | None,
    keep_best: int | None,
    metric: str | None,
    best_mode: str,
    keep_every: int | None,
    keep_every_hours: float | None,
    keep_newer_than: str | None,
    among: list[str] | None,
) -> Policy | None:
    """The policy the options describe, or ``None`` when no rule was given (keep everything)."""
    parts: list[Policy] = list(
        Keep(last=keep_last, best=keep_best, metric=metric, best_mode=best_mode, every_steps=keep_every).parts()
    )
    if keep_every_hours is not None:
        parts.append(KeepEvery(keep_every_hours * 3600))
    if keep_newer_than is not None:
        parts.append(KeepNewerThan(parse_duration(keep_newer_than)))
    if not parts:
        if among:
            raise DistckptError("--among restricts the rules; give one too (--keep-last, --keep-best, ...)")
        return None
    policy: Policy = KeepAny(*parts)
    return Among(_meta_filter(among), policy) if among else policy
