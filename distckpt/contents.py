"""What ``distckpt inspect`` and ``verify`` report: plain frozen dataclasses with ``as_json``.

Also how a ``state.json`` skeleton's non-tensor values become ``ObjectEntry`` rows (decoded
from JSON; nothing is ever unpickled).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .info import CheckpointInfo
from .tree import TENSOR, join


@dataclass(frozen=True)
class Leftover:
    """Uncommitted work under a root: never listed as a step, never restored."""

    path: str
    name: str
    kind: str  # "interrupted save", "interrupted delete" or "step without manifest"


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor and who wrote it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    rank: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    recoverable: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    chunks: tuple[Chunk, ...] = ()

    @property
    def ranks(self) -> list[int]:
        return sorted({c.rank for c in self.chunks})

    def sharding(self) -> str:
        """``r0[0:10,:] r1[10:20,:]``; ``r0 whole`` for a tensor stored in one piece."""
        parts = []
        for c in sorted(self.chunks, key=lambda c: c.offsets):
            if all(o == 0 and s == d for o, s, d in zip(c.offsets, c.sizes, self.shape, strict=False)):
                parts.append(f"r{c.rank} whole")
                continue
            dims = [
                ":" if o == 0 and s == d else f"{o}:{o + s}"
                for o, s, d in zip(c.offsets, c.sizes, self.shape, strict=False)
            ]
            parts.append(f"r{c.rank}[{','.join(dims)}]")
        return " ".join(parts) if parts else "-"


@dataclass(frozen=True)
class ObjectEntry:
    """A non-tensor value kept in ``state.json`` (JSON-safe ``value``)."""

    name: str
    type: str
    value: Any


@dataclass(frozen=True)
class StepContents:
    """What one committed step holds, from its metadata alone."""

    info: CheckpointInfo
    tensors: list[TensorEntry]
    objects: list[ObjectEntry]
    recoverables: dict[str, int]  # name -> bytes of its tensors
    files: dict[str, dict[str, Any]]  # name -> {"size", "checksum", "rank"}
    versions: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.info.step,
            "url": self.info.url,
            "time": self.info.time,
            "world_size": self.info.world_size,
            "mode": self.info.mode,
            "meta": self.info.meta,
            "nbytes": self.info.nbytes,
            "versions": self.versions,
            "recoverables": self.recoverables,
            "tensors": [
                {**asdict(t), "shape": list(t.shape), "ranks": t.ranks, "chunks": [asdict(c) for c in t.chunks]}
                for t in self.tensors
            ],
            "objects": [asdict(o) for o in self.objects],
            "files": self.files,
        }


@dataclass(frozen=True)
class FileProblem:
    step: int
    name: str
    problem: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.name}: {self.problem}"


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking one step's files against its manifest."""

    step: int
    files: int
    nbytes: int
    problems: list[FileProblem]
    unlisted: list[str] = field(default_factory=list)  # present but not in the manifest (harmless)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


_TAGGED = ("__tuple__", "__dict__", "__bytes__", "__np__", "__dtype__", "__inline__")


def objects_of(node: Any, path: str) -> list[ObjectEntry]:
    """Non-tensor leaves of a state.json skeleton, decoded (never unpickled: it is JSON).

    Containers are walked down to scalars, so ``optim.param_groups.0.lr`` is one entry; a
    list or tuple of scalars stays one entry.
    """
    if isinstance(node, dict) and TENSOR in node and len(node) <= 2:
        return []
    items: Any = None
    if isinstance(node, dict) and node and not any(tag in node for tag in _TAGGED):
        return [o for k, v in node.items() for o in objects_of(v, f"{path}.{k}")]
    if isinstance(node, list):
        items = node
    elif isinstance(node, dict) and "__tuple__" in node:
        items = node["__tuple__"]
    if items and not all(v is None or isinstance(v, (str, int, float, bool)) for v in items):
        return [o for i, v in enumerate(items) for o in objects_of(v, f"{path}.{i}")]
    value = join(node, {})
    return [ObjectEntry(path, _type_name(node, value), _jsonable(value))]


def _type_name(node: Any, value: Any) -> str:
    if isinstance(node, dict) and "__inline__" in node:
        return f"tensor {node.get('dtype')} {list(node.get('shape', []))} (inline)"
    return "None" if value is None else type(value).__name__


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (str, int, float, bool)) for v in value):
        return list(value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        try:
            json.dumps(value)
            return value
        except TypeError:
            pass
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
