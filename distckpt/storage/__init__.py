"""Where checkpoints live: the ``Storage`` seam and its two implementations.

``open_storage(url)`` picks ``PosixStorage`` for a path or ``file://`` URL and
``FsspecStorage`` (imported lazily: it needs fsspec and, for S3, s3fs) for anything else.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Storage, is_local_url, local_path, read_exactly
from .posix import PosixStorage

__all__ = ["PosixStorage", "Storage", "is_local_url", "local_path", "open_storage", "read_exactly"]


def open_storage(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage for ``url``: POSIX for plain paths and ``file://``, fsspec otherwise."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"checkpoint url must be a str path or URL, got {type(url).__name__}")
    url = os.fspath(url)
    if is_local_url(url):
        return PosixStorage(url)
    from .fsspec import FsspecStorage

    return FsspecStorage(url, storage_options or {})
