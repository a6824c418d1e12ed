"""The storage seam: the path operations distckpt needs from wherever checkpoints live.

Paths are ``str``, never ``pathlib.Path``: a remote URL such as ``s3://b/k`` would be mangled
by ``Path``. Two implementations: ``PosixStorage`` (local disk, NFS, Lustre; ``os`` directly,
so that it can fsync files and directories) and ``FsspecStorage`` (S3 through s3fs and any
other fsspec URL; the only module that imports fsspec). ``open_storage(url)`` picks one.

Storage knows nothing of DCP or of commits: ``distckpt.dcp`` reaches it through
``StorageFS`` and ``distckpt.layout.commit`` decides how a step becomes visible. The one
property that decides the commit is ``atomic_rename``.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class Storage(Protocol):
    """Where checkpoints live. Any rank may call any method; none is a collective.

    Call order for one save (see README, "How it works"): (writing ranks) ``makedirs`` the
    work directory and ``open_write`` their files through DCP; (chief) ``write_bytes``
    ``state.json`` and ``manifest.json``, then either ``rename`` the work directory onto the
    step's name (``atomic_rename``) or, on object stores, check every file's ``size`` and
    write the manifest last with ``write_bytes(..., exclusive=True)``.

    Durability: the content of a file written through ``open_write`` (once closed),
    ``write_bytes`` or ``put_file`` is on stable storage when the call returns;
    ``write_bytes`` and ``rename`` also make the entries of the directories they touch
    durable (the commit ends with both, so every file of a step is covered).
    """

    url: str  #: what the user passed (normalised)
    root: str  #: the path of ``url`` in this storage's own namespace
    atomic_rename: bool  #: ``rename`` is atomic and refuses to replace a non-empty directory

    def join(self, *parts: str) -> str:
        """A path from parts (``os.path.join`` locally, ``/``-joined on object stores)."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted; ``[]`` when it does not exist."""
        ...

    def exists(self, path: str) -> bool: ...

    def size(self, path: str) -> int:
        """Bytes in a file; ``FileNotFoundError`` when there is none."""
        ...

    def read_bytes(self, path: str) -> bytes: ...

    def open_read(self, path: str) -> BinaryIO:
        """A seekable binary stream (DCP reads items by offset)."""
        ...

    def open_write(self, path: str) -> BinaryIO:
        """A binary stream that is durable once closed (fsync / a completed upload)."""
        ...

    def write_bytes(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write a whole small file durably. Readers see the old content or the new, never a
        mix; ``exclusive``: ``FileExistsError`` if ``path`` exists (O_EXCL, If-None-Match)."""
        ...

    def makedirs(self, path: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def rmtree(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename (``atomic_rename`` storages only; others raise ``NotImplementedError``)."""
        ...

    def put_file(self, local_path: str, path: str) -> None:
        """Copy a local file here, durably (an upload on object stores)."""
        ...


def is_local_url(url: str) -> bool:
    """A plain path or ``file://`` URL (POSIX storage), as opposed to an fsspec URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The absolute filesystem path of a local URL (``file://`` and ``~`` resolved)."""
    return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def read_exactly(f: BinaryIO, view: memoryview) -> None:
    """Fill ``view`` from ``f`` (``readinto`` may return less than asked); a file that ends
    first is an error."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            raise OSError(f"unexpected end of file after {done} of {len(view)} bytes")
        done += n
