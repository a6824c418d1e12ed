"""``latest.json`` and ``best.json``: stable names other jobs and tools can read without listing.

The chief writes them after a commit (and after the retention that follows it), never
before, so a pointer never names a step that is not committed yet. It can lag: after a
crash between a commit and the pointer's update it names the previous step, and retention
may delete the step it names. So a pointer is only a hint: ``read_pointer`` checks the
step's manifest and ignores a stale pointer; ``restore()`` and ``distckpt ls`` always go by
the manifests. A pointer is a tiny JSON document, replaced atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from ..errors import CorruptCheckpointError
from ..log import log
from .catalog import Catalog, CheckpointInfo
from .manifest import step_dirname

POINTERS = ("latest", "best")


def pointer_path(catalog: Catalog, name: str) -> str:
    return catalog.storage.join(catalog.root, f"{name}.json")


def write_pointer(catalog: Catalog, name: str, info: CheckpointInfo) -> None:
    doc = {"step": info.step, "dir": step_dirname(info.step), "time": info.time, "meta": info.meta}
    catalog.storage.write_bytes(pointer_path(catalog, name), json.dumps(doc, allow_nan=True).encode())


def read_pointer(catalog: Catalog, name: str) -> CheckpointInfo | None:
    """The committed step pointer ``name`` names, checked against its manifest; ``None``
    when there is no pointer or it is stale (its step is gone or damaged)."""
    try:
        doc = json.loads(catalog.storage.read_bytes(pointer_path(catalog, name)))
        step = int(doc["step"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable pointer %s (%s)", pointer_path(catalog, name), e)
        return None
    try:
        return catalog.info(catalog.read_manifest(step))
    except CorruptCheckpointError as e:
        log.info("ignoring stale pointer %s: %s", pointer_path(catalog, name), e)
        return None


class Pointers:
    """(the primary tier's owner, after commit and retention) Keeps ``latest.json`` and,
    when a ranking is given, ``best.json`` current. Never raises: a pointer is a hint."""

    def __init__(self, catalog: Catalog, rank_best: Callable[[Sequence[CheckpointInfo]], list[int]] | None) -> None:
        self.catalog, self.rank_best = catalog, rank_best

    def update(self, infos: Sequence[CheckpointInfo]) -> None:
        if not infos:
            return
        try:
            write_pointer(self.catalog, "latest", max(infos, key=lambda c: c.step))
            ranked = self.rank_best(infos) if self.rank_best is not None else []
            if ranked:
                write_pointer(self.catalog, "best", infos[ranked[0]])
        except Exception as e:  # noqa: BLE001 - the commit stands; the pointer is retried next time
            log.warning("could not update the latest/best pointers in %s (%s)", self.catalog.storage.url, e)
