"""``PosixStorage``: a directory on local disk or a shared POSIX mount (NFS, Lustre, sshfs).

Uses ``os`` directly so that every write can be fsynced, file and directory: a step that
the commit made visible survives a power cut, not only a process crash.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import uuid
from typing import BinaryIO

from .base import local_path


class _DurableFile(io.FileIO):
    """A file that is fsynced before it is closed."""

    def close(self) -> None:
        if not self.closed:
            try:
                os.fsync(self.fileno())
            finally:
                super().close()


class PosixStorage:
    """A POSIX directory tree (see ``Storage`` for the contract of each method)."""

    atomic_rename = True

    def __init__(self, url: str) -> None:
        self.root = local_path(url)
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

    def open_write(self, path: str) -> BinaryIO:
        return io.BufferedWriter(_DurableFile(path, "w"), buffer_size=1 << 20)  # type: ignore[return-value]

    def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        if exclusive:
            _write_fd(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), data)
        else:  # a sibling, then rename: readers never see a half-written file
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            _write_fd(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), data)
            os.replace(tmp, path)
        self._fsync_dir(os.path.dirname(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def remove(self, path: str) -> None:
        os.remove(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)

    def rename(self, src: str, dst: str) -> None:
        """Atomic same-filesystem rename; refuses to replace a non-empty directory."""
        os.replace(src, dst)
        self._fsync_dir(os.path.dirname(dst))
        if os.path.dirname(src) != os.path.dirname(dst):
            self._fsync_dir(os.path.dirname(src))

    def put_file(self, local_path: str, path: str) -> None:
        """Copy durably (``copy_file_range``/``sendfile`` under ``shutil``)."""
        shutil.copyfile(local_path, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as e:  # some network filesystems refuse fsync on directories
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.ENOSYS):
                raise
        finally:
            os.close(fd)


def _write_fd(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
