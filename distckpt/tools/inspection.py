"""``distckpt inspect``: what one committed step holds, from its metadata alone.

``step_contents`` reads ``manifest.json``, ``state.json`` and DCP's ``.metadata`` (through
the restricted unpickler), never tensor data, into plain frozen dataclasses with
``as_json``. A ``state.json`` skeleton's non-tensor values become ``ObjectEntry`` rows
(decoded from JSON; nothing is ever unpickled).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..dcp import DCP_METADATA, METADATA_KEY, load_dcp_metadata
from ..dcp.index import from_json
from ..layout.catalog import Catalog, CheckpointInfo
from ..layout.manifest import Manifest
from ..tree import TENSOR, dtype_from_name, join, tensor_refs


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


def step_contents(catalog: Catalog, step: int) -> StepContents:
    """Tensors (name, shape, dtype, bytes, which ranks' files hold which chunks), non-tensor
    objects and bytes per recoverable of committed ``step``."""
    man = catalog.read_manifest(step)
    state = catalog.read_state(step, man)
    chunks = _chunks_by_fqn(dcp_metadata(catalog, step, man, state), man)
    table = state.get("tensors", {})
    tensors = []
    for fqn in saved_order(state):
        shape = tuple(int(d) for d in table[fqn]["shape"])
        nbytes = math.prod(shape) * dtype_from_name(table[fqn]["dtype"]).itemsize
        entry = TensorEntry(fqn, fqn.split(".", 1)[0], shape, table[fqn]["dtype"], nbytes, tuple(chunks.get(fqn, ())))
        tensors.append(entry)
    objects = []
    for name, skeleton in state.get("recoverables", {}).items():
        objects.extend(objects_of(skeleton, name))
    for name, ranks in state.get("per_rank", {}).items():
        objects.append(ObjectEntry(name, "per-rank state", f"one entry per rank ({len(ranks or [])} ranks)"))
    sizes = {name: 0 for name in list(state.get("recoverables", {})) + list(state.get("per_rank", {}))}
    for t in tensors:
        sizes[t.recoverable] = sizes.get(t.recoverable, 0) + t.nbytes
    files = {n: {"size": r.size, "checksum": r.checksum, "rank": r.rank} for n, r in sorted(man.files.items())}
    return StepContents(catalog.info(man), tensors, objects, sizes, files, dict(man.versions))


def dcp_metadata(catalog: Catalog, step: int, man: Manifest, state: dict[str, Any]) -> Metadata | None:
    """DCP's metadata: from its JSON copy in ``state.json``, else ``.metadata``, size- and
    checksum-checked, through the restricted unpickler (steps written before the copy)."""
    if METADATA_KEY in state:
        return from_json(state[METADATA_KEY], catalog.step_path(step))
    if DCP_METADATA not in man.files:
        return None
    data = catalog.read_checked(step, man, DCP_METADATA)
    return load_dcp_metadata(io.BytesIO(data), catalog.storage.join(catalog.step_path(step), DCP_METADATA))


def saved_order(state: dict[str, Any]) -> list[str]:
    """Tensor names in the recoverables' own order (a module's state_dict order), not DCP's."""
    table = state.get("tensors", {})
    refs = [r for skeleton in state.get("recoverables", {}).values() for r in tensor_refs(skeleton)]
    ordered = list(dict.fromkeys(r for r in refs if r in table))
    return ordered + [n for n in table if n not in set(ordered)]


def _chunks_by_fqn(md: Metadata | None, man: Manifest) -> dict[str, list[Chunk]]:
    """Each tensor's stored chunks, with the file that holds it and the rank that wrote that file."""
    if md is None:
        return {}
    files: dict[tuple[str, tuple[int, ...]], str] = {}
    for index, info in md.storage_data.items():
        files[(index.fqn, tuple(index.offset or ()))] = str(info.relative_path)
    out: dict[str, list[Chunk]] = {}
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        for c in item.chunks:
            name = files.get((fqn, tuple(c.offsets)), "?")
            rec = man.files.get(name)
            offsets, sizes = tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)
            out.setdefault(fqn, []).append(Chunk(offsets, sizes, name, rec.rank if rec else -1))
    return out


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
