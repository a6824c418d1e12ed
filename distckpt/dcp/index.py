"""DCP's metadata as JSON, so that a restore never unpickles it.

DCP describes a checkpoint in ``.metadata``, a pickle of ``Metadata``: per tensor its
dtype, size and chunks, per chunk the file, offset and length. Unpickling it builds ~5
objects per tensor through the pickle machine: 0.3 s for 10,000 tensors, seconds for a
mixture-of-experts state - the largest cost of restoring many small tensors. distckpt
still writes ``.metadata`` (plain ``dcp.load`` reads every step), and next to it, in
``state.json``, the same description as JSON (``to_json``), which ``from_json`` turns back
into an equal ``Metadata`` in a fraction of the time, with no pickle involved.

Each stored item's ``heads`` entry is the length of the frame before its data
(``writer.frame``), so that a restore finds every tensor's bytes without building frames
(``direct``); a step written before it was recorded has none.

Only what distckpt writes is mirrored: plain-layout tensors, flat planner data (each fqn
maps to itself), no byte items, no storage transforms. Anything else makes ``to_json``
return None, and the restore reads ``.metadata`` (through the restricted unpickler).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import CorruptCheckpointError
from ..tree import dtype_from_name, dtype_name
from .writer import frame

METADATA_KEY = "dcp_metadata"  # where state.json holds it
FORMAT = 1
_FORMATS = {f: getattr(torch, f) for f in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")}
_FORMAT_NAMES = {v: k for k, v in _FORMATS.items()}


def to_json(md: Metadata) -> dict[str, Any] | None:
    """``md`` as JSON; None when it holds anything this form does not express. Tensor
    properties and file names are listed once and referred to by position."""
    if md.planner_data is not None and any(v != (k,) for k, v in md.planner_data.items()):
        return None
    props: dict[tuple[Any, ...], int] = {}
    position: dict[str, int] = {}
    chunk_of: dict[tuple[str, tuple[int, ...]], tuple[torch.dtype, tuple[int, ...]]] = {}  # -> dtype, sizes
    tensors = []
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            return None
        p = item.properties
        if p.layout != torch.strided or p.memory_format not in _FORMAT_NAMES:
            return None
        key = (dtype_name(p.dtype), p.requires_grad, _FORMAT_NAMES[p.memory_format], p.pin_memory)
        position[fqn] = len(tensors)
        chunks = [[list(c.offsets), list(c.sizes)] for c in item.chunks]
        chunk_of.update(((fqn, tuple(c.offsets)), (p.dtype, tuple(c.sizes))) for c in item.chunks)
        tensors.append([fqn, props.setdefault(key, len(props)), list(item.size), chunks])
    files: dict[str, int] = {}
    storage, heads = [], []
    for index, info in (md.storage_data or {}).items():
        if not isinstance(info, _StorageInfo) or info.transform_descriptors or index.fqn not in position:
            return None
        where = files.setdefault(info.relative_path, len(files))
        storage.append([position[index.fqn], list(index.offset or ()), index.index, where, info.offset, info.length])
        chunk = chunk_of.get((index.fqn, tuple(index.offset or ())))
        if chunk is None:
            return None
        heads.append(len(frame(*chunk)[0]))  # as FastWriter framed it: a tensor of the chunk's shape
    return {
        "format": FORMAT,
        "version": md.version,
        "flat": md.planner_data is not None,
        "properties": [list(k) for k in props],
        "tensors": tensors,
        "files": list(files),
        "storage": storage,
        "heads": heads,
    }


def from_json(data: Any, where: str) -> Metadata:
    """The ``Metadata`` that ``to_json`` described (``storage_meta`` left empty)."""
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this distckpt reads {FORMAT}")
        props = [
            TensorProperties(dtype_from_name(d), torch.strided, bool(grad), _FORMATS[fmt], bool(pin))
            for d, grad, fmt, pin in data["properties"]
        ]
        names = [t[0] for t in data["tensors"]]
        state = {
            fqn: TensorStorageMetadata(
                props[p], torch.Size(size), [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
            )
            for fqn, p, size, chunks in data["tensors"]
        }
        files = data["files"]
        storage = {
            MetadataIndex(names[t], torch.Size(offset), index): _StorageInfo(files[f], off, length)
            for t, offset, index, f, off, length in data["storage"]
        }
        return Metadata(
            state,
            planner_data={fqn: (fqn,) for fqn in state} if data["flat"] else None,
            storage_data=storage,
            storage_meta=StorageMeta(),
            version=data["version"],
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{where}: the tensor index in state.json is unreadable ({type(e).__name__}: {e}); "
            "this step is damaged, restore an older step"
        ) from e
