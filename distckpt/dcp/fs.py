"""DCP's storage layer over distckpt's ``Storage``: one bridge for every backend.

DCP's ``FileSystemWriter``/``FileSystemReader`` do their I/O through a ``FileSystemBase``
(``create_stream``, ``rename``, ...). ``StorageFS`` implements it over any ``Storage``, so
local disk and S3 share one writer and one reader, and it checksums (XXH3-64) every file
as it is written: the bytes are hashed on their way to storage, never read back.
``StorageWriter`` and ``StorageReader`` are DCP's own classes with that file system in
place of their default one (as torch's ``FsspecWriter`` does with its fsspec one).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from ..layout.manifest import Checksum, FileRecord
from ..storage import Storage
from .safe import SafeReaderMixin


class FileRecorder:
    """Thread-safe ``{name: (size, checksum)}`` of the files a writer wrote, filled by its
    threads; ``os_errors`` keeps the OS errors that torch's zip writer would otherwise turn
    into a vague ``RuntimeError`` (the errno, ENOSPC or EIO, is what users need)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, str | None]] = {}
        self.os_errors: list[OSError] = []

    def put(self, path: str, size: int, digest: str | None) -> None:
        with self._lock:
            self._files[os.path.basename(path)] = (size, digest)

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            if os.path.basename(old) in self._files:
                self._files[os.path.basename(new)] = self._files.pop(os.path.basename(old))

    def records(self, rank: int, read_back: Callable[[str], tuple[int, str]]) -> list[FileRecord]:
        """This rank's files; ``read_back(name) -> (size, checksum)`` for a file whose stream
        was seeked while written (so its running checksum does not describe it)."""
        with self._lock:
            files = dict(self._files)
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
        self._raw, self._recorder = raw, recorder
        self.sum = Checksum()
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
        self.sum.update(view if n is None or n == len(view) else view[:n])
        return len(view) if n is None else n

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.sequential = False  # the running checksum no longer describes the file
        return self._raw.seek(offset, whence)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        # DCP closes its stream inside the ``with`` body; ``create_stream`` closes ``raw``
        # (which makes it durable) when the body ends.
        if not self.closed:
            self.flush()
        super().close()


class StorageFS(FileSystemBase):
    """``FileSystemBase`` over a ``Storage``; streams opened for writing are checksummed
    into ``recorder`` (None for readers). For reading a node-local step: ``moved``, files
    that are elsewhere (path -> where: a node's replica of the step); ``given``, small files
    this node lacks, as another rank sent them (path -> bytes)."""

    def __init__(
        self,
        storage: Storage,
        recorder: FileRecorder | None = None,
        moved: dict[str, str] | None = None,
        given: dict[str, bytes] | None = None,
    ) -> None:
        self.storage, self.recorder = storage, recorder
        self.moved, self.given = moved or {}, given or {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        path = str(path)
        if "w" not in mode and path in self.given:
            yield io.BytesIO(self.given[path])
            return
        if "w" not in mode:
            path = self.moved.get(path, path)
            with self.storage.open_read(path) as raw:
                yield raw
            return
        with self.storage.open_write(path) as raw:
            if self.recorder is None:
                yield raw
                return
            stream = _HashingStream(raw, self.recorder)
            yield stream
            digest = stream.sum.hexdigest() if stream.sequential else None
        self.recorder.put(path, stream.sum.size, digest)  # once durable

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return self.storage.join(str(path), suffix)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        """DCP renames ``.metadata.tmp`` onto ``.metadata``; object stores copy the (small)
        file: the manifest, written last, is what commits the step there."""
        old, new = str(path), str(new_path)
        if self.storage.atomic_rename:
            self.storage.rename(old, new)
        else:
            self.storage.write_bytes(new, self.storage.read_bytes(old))
            self.storage.remove(old)
        if self.recorder is not None:
            self.recorder.rename(old, new)

    def init_path(self, path: str | os.PathLike) -> str:
        return str(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.storage.makedirs(str(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return self.storage.exists(str(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.storage.remove(str(path))


class StorageWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` writing through ``StorageFS`` (durable files, checksums)."""

    def __init__(self, storage: Storage, path: str, thread_count: int) -> None:
        # sync_files=False: StorageFS's streams are durable once closed (fsync / upload)
        super().__init__(path, thread_count=thread_count, sync_files=False, overwrite=True)
        self.recorder = FileRecorder()
        self.fs = StorageFS(storage, self.recorder)
        self.path = path


class StorageReader(SafeReaderMixin, FileSystemReader):
    """DCP's ``FileSystemReader`` reading through ``StorageFS`` (restricted unpickling)."""

    def __init__(self, storage: Storage, path: str) -> None:
        super().__init__(path)
        self.fs = StorageFS(storage)
        self.path = path
