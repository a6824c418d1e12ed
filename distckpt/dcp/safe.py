"""Reading DCP checkpoints without running code from them.

* ``load_dcp_metadata`` / ``SafeReaderMixin`` read DCP's pickled ``.metadata`` with an
  unpickler that only admits DCP's own metadata classes and torch dtypes, so a doctored
  checkpoint cannot run code;
* ``SafeLoadPlanner`` refuses pickled (byte) items instead of unpickling them: distckpt
  only ever hands DCP tensors, whose items DCP loads with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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
    """Overrides ``read_metadata`` of a DCP reader with the restricted unpickler."""

    fs: Any
    path: Any
    load_id: str

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
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

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CorruptCheckpointError(
            f"checkpoint item {read_item.dest_index.fqn!r} is pickled data, which distckpt "
            "never writes and will not unpickle; load it with torch.distributed.checkpoint directly"
        )
