"""``FsspecStorage``: any fsspec filesystem (S3 through s3fs, GCS, memory, ...).

The only module of distckpt that imports fsspec. Object stores have no atomic rename
(fsspec's ``mv`` is copy + delete), so ``atomic_rename`` is false here and the commit is
the manifest, written last with an exclusive create (``If-None-Match: *`` on S3).
"""

from __future__ import annotations

import posixpath
from typing import Any, BinaryIO

import fsspec


class FsspecStorage:
    """An fsspec URL (see ``Storage`` for the contract of each method)."""

    atomic_rename = False

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as e:  # fsspec says which package to install
            raise ValueError(f"cannot open {url!r}: {e}") from e
        self.root = root.rstrip("/")

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in entries if p.rstrip("/") != path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def size(self, path: str) -> int:
        return int(self.fs.info(path)["size"])

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    def open_write(self, path: str) -> BinaryIO:
        return self.fs.open(path, "wb")  # a (multipart) upload, complete once closed

    def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        if exclusive:
            self.fs.pipe_file(path, data, mode="create")
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def remove(self, path: str) -> None:
        self.fs.rm_file(path)

    def rmtree(self, path: str) -> None:
        self.fs.rm(path, recursive=True)

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError(f"{self.url} has no atomic rename; commit with a marker")

    def put_file(self, local_path: str, path: str) -> None:
        """Upload; s3fs sends large files as a parallel multipart upload, with at most
        ``max_concurrency`` parts in flight (a storage option, default 10)."""
        self.fs.put_file(local_path, path)
