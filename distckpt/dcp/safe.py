"""Reading DCP checkpoints without running code from them.

* ``load_dcp_metadata`` / ``SafeReaderMixin`` read DCP's pickled ``.metadata`` with an
  unpickler that only admits DCP's own metadata classes and torch dtypes, so a doctored
  checkpoint cannot run code;
* ``SafeLoadPlanner`` refuses pickled (byte) items instead of unpickling them: distckpt
  only ever hands DCP tensors, whose items DCP loads with ``weights_only=True``. It also
  plans a plain tensor stored whole (one chunk) in one step, where DCP's default planner
  runs its resharding sweep and its ``narrow`` per tensor (~0.1 ms each): what a state of
  100,000 small tensors spends most of its restore on.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from ..errors import CorruptCheckpointError
from ..layout.catalog import DCP_METADATA

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from DCP metadata")


def load_dcp_metadata(stream: Any, where: str) -> Metadata:
    """Unpickle DCP's ``.metadata`` admitting only DCP's own classes and torch enums."""
    try:
        md = _MetadataUnpickler(stream).load()
    except Exception as e:
        raise CorruptCheckpointError(
            f"{where}: DCP metadata is unreadable or not allowed ({e}); this step is damaged or "
            "was not written by torch.distributed.checkpoint; restore an older step"
        ) from e
    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(f"{where}: DCP metadata holds a {type(md).__name__}, not Metadata")
    return md


class SafeReaderMixin:
    """Overrides ``read_metadata`` of a DCP reader with the restricted unpickler, or with
    ``known_metadata`` when the caller has it already (``index.from_json``)."""

    fs: Any
    path: Any
    load_id: str
    known_metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = self.known_metadata
        if md is None:
            path = self.fs.concat_path(self.path, DCP_METADATA)
            with self.fs.create_stream(path, "rb") as f:
                md = load_dcp_metadata(f, str(path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """Default planner that refuses pickled (non-tensor) items instead of unpickling them.

    distckpt only ever hands DCP tensors; its other values live in JSON.
    """

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata if self.metadata is not None else {}
        if self.state_dict.keys() != stored.keys():  # partial or older checkpoints: DCP's own rules
            return super().create_local_plan()
        strict = not self.allow_partial_load
        requests: list[ReadItem] = []
        for fqn, obj in self.state_dict.items():
            whole = _whole_chunk(stored[fqn], obj)
            if whole is None:
                requests += create_default_local_load_plan({fqn: obj}, self.metadata, strict).items
            else:
                index = MetadataIndex(fqn, whole, 0)
                requests.append(ReadItem(LoadItemType.TENSOR, index, whole, index, whole, obj.size()))
        return LoadPlan(requests)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        obj = self.state_dict.get(read_item.dest_index.fqn)
        if type(obj) is torch.Tensor and read_item.lengths == obj.size() and not any(read_item.dest_offsets):
            return obj
        return super().resolve_tensor(read_item)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CorruptCheckpointError(
            f"checkpoint item {read_item.dest_index.fqn!r} is pickled data, which distckpt "
            "never writes and will not unpickle; load it with torch.distributed.checkpoint directly"
        )


def _whole_chunk(stored: Any, obj: Any) -> torch.Size | None:
    """The (zero) offsets of a plain tensor stored whole, in one chunk, with its current size;
    None when DCP's resharding planner has to work it out (or report the mismatch), and for
    an empty tensor, for which DCP plans no read at all."""
    if (
        type(obj) is not torch.Tensor
        or not obj.numel()
        or not isinstance(stored, TensorStorageMetadata)
        or len(stored.chunks) != 1
    ):
        return None
    chunk = stored.chunks[0]
    if stored.size != obj.size() or chunk.sizes != stored.size or any(chunk.offsets):
        return None
    return chunk.offsets
