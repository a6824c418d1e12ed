"""How a step becomes visible, atomically: the ``Commit`` seam.

Call order for one save (the chief unless said otherwise):
  0. (at open, the rank that owns the tier) ``open_root()``.
  1. ``workdir(step, nonce)``: where every rank writes the step's files; (writing ranks)
     ``create_workdir(path)``.
  2. (all ranks) write files there; the chief gathers their names, sizes and checksums.
  3. ``finish(workdir, manifest)``: make the step visible with one atomic act,
     or ``abort(workdir)`` if any rank failed.
Retention calls ``delete(step)``, which un-commits first (one atomic act) and then removes
files, so a half-deleted step is never mistaken for a committed one.

``commit_for(storage)`` picks the strategy from ``storage.atomic_rename``; nothing else in
distckpt looks at that property.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from ..errors import CommitError
from ..log import log
from ..storage import Storage
from . import recycle as recycle_files
from .guarantees import honours_exclusive_create
from .manifest import MANIFEST, Manifest, step_dirname

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class Commit(Protocol):
    storage: Storage

    def open_root(self) -> None:
        """Make the root ready to hold steps (a directory where directories exist)."""
        ...

    def workdir(self, step: int, nonce: str) -> str:
        """Where the files of ``step`` are written before the commit."""
        ...

    def create_workdir(self, path: str) -> None: ...

    def finish(self, workdir: str, manifest: Manifest) -> str:
        """Commit: afterwards the step is listed; before, it never is. Returns its path.
        ``CommitError`` when the step is committed already (of two writers, one wins)."""
        ...

    def abort(self, workdir: str) -> None:
        """Remove an uncommitted step's files (never a committed step's)."""
        ...

    def delete(self, step: int, recycle: bool = False) -> None:
        """Un-commit ``step`` atomically, then remove its files; with ``recycle``, its data
        files may go to the pool the next save writes over (``recycle.give``) instead."""
        ...

    def is_leftover(self, name: str) -> bool:
        """Whether a name in the root is this strategy's uncommitted work."""
        ...


class RenameCommit:
    """POSIX: write into a hidden sibling, fsync, then ``rename`` onto ``step_<n>``.

    ``rename(2)`` of a directory is atomic on local filesystems, NFS and Lustre, and it
    refuses to replace a non-empty directory, so a step is committed at most once.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.root = storage.root

    def open_root(self) -> None:
        self.storage.makedirs(self.root)

    def workdir(self, step: int, nonce: str) -> str:
        return self.storage.join(self.root, f"{TMP_PREFIX}{step_dirname(step)}-{nonce}")

    def create_workdir(self, path: str) -> None:
        self.storage.makedirs(path)

    def finish(self, workdir: str, manifest: Manifest) -> str:
        step = manifest.step
        final = self.storage.join(self.root, step_dirname(step))
        # write_bytes fsyncs the manifest and the work directory (every file's entry)
        self.storage.write_bytes(self.storage.join(workdir, MANIFEST), manifest.to_json())
        try:
            self.storage.rename(workdir, final)
        except OSError as e:
            if self.storage.exists(self.storage.join(final, MANIFEST)):
                raise CommitError(
                    f"step {step} is already committed at {final}; save under a new step "
                    "number or delete that step first"
                ) from e
            raise CommitError(f"could not commit step {step} to {final}: {e}") from e
        return final

    def abort(self, workdir: str) -> None:
        _remove_quietly(self.storage, workdir)

    def delete(self, step: int, recycle: bool = False) -> None:
        final = self.storage.join(self.root, step_dirname(step))
        trash = self.storage.join(self.root, f"{TRASH_PREFIX}{step_dirname(step)}-{uuid.uuid4().hex[:8]}")
        self.storage.rename(final, trash)  # un-commit atomically, then clean up at leisure
        if recycle:
            recycle_files.give(self.storage, trash)
        self.storage.rmtree(trash)

    def is_leftover(self, name: str) -> bool:
        return name.startswith((TMP_PREFIX, TRASH_PREFIX))


class MarkerCommit:
    """Object stores: files are written in place; the manifest is the commit marker.

    The chief confirms every listed file exists with its recorded size, then writes
    ``manifest.json`` with an exclusive create (``If-None-Match: *``): of two writers,
    exactly one commits. On a store that ignores that header (``guarantees``) it checks the
    manifest is absent, writes it and reads it back: a writer whose manifest does not stand
    fails; the window left is two writers between the check and the write at once, which
    the lease (one writing job per root) and its fencing before each commit rule out. Object stores have no directories: ``open_root`` only makes sure
    the bucket exists (s3fs creates a missing one).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.root = storage.root

    def open_root(self) -> None:
        self.storage.makedirs(self.root)

    def workdir(self, step: int, nonce: str) -> str:
        return self.storage.join(self.root, step_dirname(step))

    def create_workdir(self, path: str) -> None:
        pass

    def finish(self, workdir: str, manifest: Manifest) -> str:
        step = manifest.step
        for rec in manifest.files.values():
            path = self.storage.join(workdir, rec.name)
            try:
                size: int | None = self.storage.size(path)
            except FileNotFoundError:
                size = None
            if size != rec.size:
                raise CommitError(
                    f"step {step}: {path} is {'missing' if size is None else f'{size} bytes'}, "
                    f"expected {rec.size}; the upload did not complete, so the step stays uncommitted"
                )
        path, data = self.storage.join(workdir, MANIFEST), manifest.to_json()
        taken = CommitError(f"step {step} is already committed at {workdir}; save under a new step number")
        if honours_exclusive_create(self.storage, self.root):
            try:
                self.storage.write_bytes(path, data, exclusive=True)
            except FileExistsError as e:
                raise taken from e
            return workdir
        # a store that ignores If-None-Match: look first, write, and read back what stands
        if self.storage.exists(path):
            raise taken
        self.storage.write_bytes(path, data)
        if self.storage.read_bytes(path) != data:
            raise CommitError(f"another writer committed step {step} at {workdir} at the same moment; this save lost")
        return workdir

    def abort(self, workdir: str) -> None:
        if not self.storage.exists(self.storage.join(workdir, MANIFEST)):
            _remove_quietly(self.storage, workdir)

    def delete(self, step: int, recycle: bool = False) -> None:  # object stores: nothing to recycle
        final = self.storage.join(self.root, step_dirname(step))
        self.storage.remove(self.storage.join(final, MANIFEST))  # un-commit first
        self.storage.rmtree(final)

    def is_leftover(self, name: str) -> bool:
        return False  # uncommitted steps are found by their missing manifest


def commit_for(storage: Storage) -> Commit:
    return RenameCommit(storage) if storage.atomic_rename else MarkerCommit(storage)


def _remove_quietly(storage: Storage, path: str) -> None:
    try:
        if storage.exists(path):
            storage.rmtree(path)
    except OSError as e:
        log.warning("could not remove uncommitted %s (%s); it will be retried later", path, e)
