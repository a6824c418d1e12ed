"""The storage seam: a small set of path operations, plus how DCP reaches the same place.

Paths are ``str``, never ``pathlib.Path``: a remote URL such as ``s3://b/k`` would be
mangled by ``Path``. ``LocalStorage`` (local disk, NFS, Lustre) uses ``os`` directly so
that it can fsync files and directories; every other URL goes through fsspec in
``distckpt.fsspec_storage``, the only module that imports fsspec.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, BinaryIO, Protocol, runtime_checkable

from .dcp_io import SafeFileSystemReader, local_writer


@runtime_checkable
class Storage(Protocol):
    """Where checkpoints live. All methods are called by whichever rank needs them.

    Call order for a save on POSIX storage: (all ranks) ``dcp_writer`` writes into a
    work directory; (chief) ``write_bytes`` for ``state.json`` and ``manifest.json``,
    ``fsync_dir``, ``rename`` the work directory onto its final name.
    On object stores (``atomic_rename`` false) the chief instead checks ``size`` of every
    file and writes the manifest last with ``write_bytes(..., exclusive=True)``.
    """

    url: str
    atomic_rename: bool
    root: str

    def join(self, *parts: str) -> str: ...
    def listdir(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def size(self, path: str) -> int: ...
    def read_bytes(self, path: str) -> bytes: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False) -> None: ...
    def makedirs(self, path: str) -> None: ...
    def rmtree(self, path: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def fsync_dir(self, path: str) -> None: ...
    def put_file(self, local_path: str, path: str) -> None: ...
    def dcp_writer(self, path: str, thread_count: int) -> Any: ...
    def dcp_reader(self, path: str, contiguous: bool = False) -> Any: ...


class LocalStorage:
    """A POSIX directory: local disk or a shared mount (NFS, Lustre, sshfs)."""

    atomic_rename = True

    def __init__(self, url: str) -> None:
        path = url[len("file://") :] if url.startswith("file://") else url
        self.root = os.path.abspath(os.path.expanduser(path))
        self.url = self.root

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except NotADirectoryError as e:
            raise NotADirectoryError(f"{path} is a file, not a checkpoint directory") from e

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)

    def remove(self, path: str) -> None:
        os.remove(path)

    def rename(self, src: str, dst: str) -> None:
        """Atomic same-filesystem rename; refuses to replace a non-empty directory."""
        os.replace(src, dst)
        self.fsync_dir(os.path.dirname(dst))
        if os.path.dirname(src) != os.path.dirname(dst):
            self.fsync_dir(os.path.dirname(src))

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as e:  # some network filesystems refuse fsync on directories
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.ENOSYS):
                raise
        finally:
            os.close(fd)

    def put_file(self, local_path: str, path: str) -> None:
        """Copy a local file here, durably (``copy_file_range``/``sendfile`` under the hood)."""
        shutil.copyfile(local_path, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def dcp_writer(self, path: str, thread_count: int) -> Any:
        return local_writer(path, thread_count)

    def dcp_reader(self, path: str, contiguous: bool = False) -> Any:
        """DCP reader for a step; ``contiguous`` steps (distckpt's staged saves) take the fast path."""
        if contiguous:
            from .reader import FastReader

            return FastReader(path, threads=min(8, os.cpu_count() or 1))
        return SafeFileSystemReader(path)


def open_storage(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """Pick the storage for ``url``: POSIX for plain paths and ``file://``, fsspec otherwise."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"checkpoint url must be a str path or URL, got {type(url).__name__}")
    url = os.fspath(url)
    if "://" not in url or url.startswith("file://"):
        return LocalStorage(url)
    from .fsspec_storage import FsspecStorage

    return FsspecStorage(url, storage_options or {})
