"""The places where distckpt meets torch.distributed.checkpoint's storage layer.

* ``record_files(writer)`` makes a DCP writer checksum every file while it writes it
  (XXH3-64 over the bytes as they pass; no second read).
* ``SafeReaderMixin`` reads DCP's pickled ``.metadata`` with an unpickler that only
  admits DCP's own metadata classes and torch dtypes, so a doctored checkpoint cannot
  run code; ``SafeLoadPlanner`` loads any byte item with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import CorruptCheckpointError
from .manifest import Checksum, FileRecord

DCP_METADATA = ".metadata"


class FileRecorder:
    """Thread-safe ``{path: (size, checksum)}`` filled by the writer threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, str | None]] = {}
        # OS errors seen by the streams: torch's zip writer replaces them with a vague
        # RuntimeError ("unexpected pos"), and the errno (ENOSPC, EIO) is what users need
        self.os_errors: list[OSError] = []

    def put(self, path: str, size: int, digest: str | None) -> None:
        with self._lock:
            self._files[path] = (size, digest)

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            if old in self._files:
                self._files[new] = self._files.pop(old)

    def to_file_records(self, rank: int, read_back: Any) -> list[FileRecord]:
        """This rank's files; ``read_back(name) -> (size, checksum)`` for a file whose stream
        was seeked (so its running checksum is void)."""
        with self._lock:
            files = {os.path.basename(p): v for p, v in self._files.items()}
        out = []
        for name, (size, digest) in sorted(files.items()):
            if digest is None:
                size, digest = read_back(name)
            out.append(FileRecord(name, size, digest, rank))
        return out


class _HashingStream(io.RawIOBase):
    """A write-only stream that checksums what passes through to ``raw``."""

    def __init__(self, raw: Any, recorder: FileRecorder) -> None:
        super().__init__()
        self._raw = raw
        self._recorder = recorder
        self._sum = Checksum()
        self.sequential = True

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            n = self._raw.write(b)
        except OSError as e:
            self._recorder.os_errors.append(e)
            raise
        view = memoryview(b).cast("B")
        self._sum.update(view if n is None or n == len(view) else view[:n])
        return len(view) if n is None else n

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.sequential = False  # the running checksum no longer describes the file
        return self._raw.seek(offset, whence)

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        # DCP closes its stream inside the ``with`` body; the owner closes ``raw``.
        self.flush()
        super().close()


class _HashingFS:
    """Wraps a DCP ``FileSystem``; every stream opened for writing is checksummed."""

    def __init__(self, inner: Any, recorder: FileRecorder) -> None:
        self._inner, self._recorder = inner, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self._inner.create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw, self._recorder)
            yield stream
            digest = stream._sum.hexdigest() if stream.sequential else None
            self._recorder.put(str(path), stream._sum.size, digest)

    def rename(self, path: Any, new_path: Any) -> None:
        self._inner.rename(path, new_path)
        self._recorder.rename(str(path), str(new_path))


def record_files(writer: Any) -> FileRecorder:
    """Make ``writer`` (a DCP FileSystemWriter or FsspecWriter) record what it writes."""
    recorder = FileRecorder()
    writer.fs = _HashingFS(writer.fs, recorder)
    return recorder


def local_writer(path: str, thread_count: int) -> FileSystemWriter:
    return FileSystemWriter(path, thread_count=thread_count, sync_files=True, overwrite=True)


# --- safe reading -------------------------------------------------------------------------

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


class SafeFileSystemReader(SafeReaderMixin, FileSystemReader):
    """``FileSystemReader`` that never runs code from the checkpoint."""


class SafeLoadPlanner(DefaultLoadPlanner):
    """Default planner that refuses pickled (non-tensor) items instead of unpickling them.

    distckpt only ever hands DCP tensors; its other values live in JSON.
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CorruptCheckpointError(
            f"checkpoint item {read_item.dest_index.fqn!r} is pickled data, which distckpt "
            "never writes and will not unpickle; load it with torch.distributed.checkpoint directly"
        )
