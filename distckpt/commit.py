"""How a step becomes visible, atomically: the ``Commit`` seam.

Call order for one save (all on the chief unless said otherwise):
  1. ``workdir(step, nonce)``: the path every rank writes the step's files into.
  2. (all ranks) write files there; the chief gathers their names, sizes and checksums.
  3. ``finish(workdir, manifest)``: make the step visible with one atomic act,
     or ``abort(workdir)`` if any rank failed.
Retention calls ``delete(step)``, which un-commits first (one atomic act) and then
removes files, so a half-deleted step is never mistaken for a committed one.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from .errors import CommitError
from .log import log
from .manifest import MANIFEST, Manifest, step_dirname
from .storage import Storage

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class Commit(Protocol):
    def workdir(self, step: int, nonce: str) -> str: ...
    def finish(self, workdir: str, manifest: Manifest) -> str: ...
    def abort(self, workdir: str) -> None: ...
    def delete(self, step: int) -> None: ...
    def is_leftover(self, name: str) -> bool: ...


class RenameCommit:
    """POSIX: write into a hidden sibling, fsync, then ``rename`` onto ``step_<n>``.

    ``rename(2)`` of a directory is atomic on local filesystems, NFS and Lustre, and it
    refuses to replace a non-empty directory, so a step is committed at most once.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.root = storage.root

    def workdir(self, step: int, nonce: str) -> str:
        return self.storage.join(self.root, f"{TMP_PREFIX}{step_dirname(step)}-{nonce}")

    def finish(self, workdir: str, manifest: Manifest) -> str:
        step = manifest.step
        final = self.storage.join(self.root, step_dirname(step))
        self.storage.write_bytes(self.storage.join(workdir, MANIFEST), manifest.to_json())
        self.storage.fsync_dir(workdir)
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

    def delete(self, step: int) -> None:
        final = self.storage.join(self.root, step_dirname(step))
        trash = self.storage.join(self.root, f"{TRASH_PREFIX}{step_dirname(step)}-{uuid.uuid4().hex[:8]}")
        self.storage.rename(final, trash)  # un-commit atomically, then clean up at leisure
        self.storage.rmtree(trash)

    def is_leftover(self, name: str) -> bool:
        return name.startswith((TMP_PREFIX, TRASH_PREFIX))


class MarkerCommit:
    """Object stores: files are written in place; the manifest is the commit marker.

    The chief confirms every listed file exists with its recorded size, then writes
    ``manifest.json`` with an exclusive create (``If-None-Match: *``): of two writers,
    exactly one commits.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.root = storage.root

    def workdir(self, step: int, nonce: str) -> str:
        return self.storage.join(self.root, step_dirname(step))

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
        try:
            self.storage.write_bytes(self.storage.join(workdir, MANIFEST), manifest.to_json(), exclusive=True)
        except FileExistsError as e:
            raise CommitError(f"step {step} is already committed at {workdir}; save under a new step number") from e
        return workdir

    def abort(self, workdir: str) -> None:
        if not self.storage.exists(self.storage.join(workdir, MANIFEST)):
            _remove_quietly(self.storage, workdir)

    def delete(self, step: int) -> None:
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
