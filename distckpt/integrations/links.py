"""Links: a framework's checkpoint path as a small JSON file naming one committed step.

Frameworks name checkpoints by path and overwrite or delete them by path (Lightning's
``last.ckpt`` and top-k, Accelerate's ``checkpoint_<i>``); distckpt commits numbered steps
under a root. A link joins the two::

    {"format": "distckpt-link", "version": 1, "root": ".distckpt", "step": 7, "meta": {...}}

``root`` is relative to the link's directory when the root lies beneath it (so moving the
whole directory keeps every link valid), else the root's absolute URL.

Call order (all on the chief, which owns the links; nothing here is a collective):
  1. ``link_after_commit(handle, path, ...)``: queued; the background thread waits for
     the save's commit, then writes the link atomically (a crash in between leaves the
     previous link, naming a step that is still committed).
  2. ``unlink(path)``: queued behind the saves before it; removes the link.
  3. A link replaced or removed hands the step it named to retention (``policy``): every
     save makes a new step with exactly one link, so that step is no longer reachable. The
     step is deleted after the next commit (or by ``Checkpointer.delete()``), never the
     newest one, never before its replacement is committed.
  4. ``flush()``: every queued link written; raises the first error, once.
"""

from __future__ import annotations

import json
import os
import posixpath
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DistckptError
from ..layout.catalog import CheckpointInfo
from ..log import log
from ..save_job import SaveHandle
from ..storage import Storage, is_local_url, open_storage

FORMAT = "distckpt-link"
MAX_LINK_BYTES = 1 << 20  # a link is a few hundred bytes; anything bigger is not one


@dataclass(frozen=True)
class Link:
    """Where a framework path's checkpoint lives: ``root`` (a URL) and ``step``."""

    root: str
    step: int
    meta: dict[str, Any] = field(default_factory=dict)


def parent(path: str) -> str:
    """The directory of a local path or URL (``s3://b/run/last.ckpt`` -> ``s3://b/run``)."""
    if is_local_url(path):
        return os.path.dirname(os.path.abspath(path.removeprefix("file://")))
    return posixpath.dirname(path.rstrip("/"))


def _storage_path(path: str, storage_options: dict[str, Any] | None) -> tuple[Storage, str]:
    storage = open_storage(parent(path), storage_options)
    return storage, storage.join(storage.root, posixpath.basename(path.rstrip("/")))


def _relative(root: str, base: str) -> str:
    if is_local_url(root) and is_local_url(base):
        root_abs = os.path.abspath(root.removeprefix("file://"))
        rel = os.path.relpath(root_abs, base)
        return root_abs if rel.startswith(os.path.join("..", "..")) else rel  # beside or beneath: relative
    prefix = base.rstrip("/") + "/"
    return root[len(prefix) :] if root.startswith(prefix) else root


def write_link(path: str, root: str, step: int, meta: dict[str, Any], storage_options: dict | None = None) -> None:
    """Write (atomically replace) the link at ``path`` naming ``step`` under ``root``."""
    storage, spath = _storage_path(path, storage_options)
    doc = {"format": FORMAT, "version": 1, "root": _relative(root, parent(path)), "step": step, "meta": meta}
    storage.makedirs(storage.root)
    storage.write_bytes(spath, json.dumps(doc, indent=1, allow_nan=True).encode())


def write_link_dir(
    directory: str, name: str, root: str, step: int, meta: dict[str, Any], files: dict[str, bytes]
) -> None:
    """Make ``directory`` appear at once, holding ``files`` and the link ``name``: written into
    a hidden sibling, then renamed into place (local directories only: the framework lists
    them, and a half-written one must never be listed). Replaces an existing ``directory``."""
    directory = os.path.abspath(directory.removeprefix("file://"))
    tmp = os.path.join(os.path.dirname(directory), f".tmp-{os.path.basename(directory)}")
    storage = open_storage(os.path.dirname(directory))
    if os.path.exists(tmp):
        storage.rmtree(tmp)
    storage.makedirs(tmp)
    for fname, data in files.items():
        storage.write_bytes(os.path.join(tmp, fname), data)
    write_link(os.path.join(tmp, name), root if not is_local_url(root) else os.path.abspath(root), step, meta)
    if os.path.exists(directory):
        storage.rmtree(directory)
    storage.rename(tmp, directory)


def root_beside(path: str, url: str | None = None) -> str:
    """The distckpt root for a framework path: ``url`` when given, else ``.distckpt`` in the
    path's own directory (moving that directory moves its checkpoints with it)."""
    if url is not None:
        return os.fspath(url)
    base = parent(path)
    return os.path.join(base, ".distckpt") if is_local_url(base) else posixpath.join(base, ".distckpt")


def checkpoint_options(options: dict[str, Any] | None, owner: str) -> dict[str, Any]:
    """A framework integration's ``Checkpointer`` options: async by default; the options the
    integration sets itself are refused with a clear error."""
    out = {"async_save": True, **(options or {})}
    for name in ("keep", "read_only", "recoverables", "process_group"):
        if name in out:
            raise TypeError(f"{owner} sets {name}= itself")
    return out


def first_free_step(ckpt: Any) -> int:
    """The step number after every committed one (link targets are numbered in save order)."""
    return max((i.step for i in ckpt.list()), default=0) + 1


def read_link(path: str, storage_options: dict | None = None) -> Link | None:
    """The link at ``path``; ``None`` when ``path`` is not a link (a framework's own file).
    Raises ``FileNotFoundError`` when there is nothing at ``path``."""
    storage, spath = _storage_path(path, storage_options)
    if storage.size(spath) > MAX_LINK_BYTES:
        return None
    data = storage.read_bytes(spath)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    root = str(doc["root"])
    if "://" not in root and not os.path.isabs(root):
        base = parent(path)
        root = os.path.join(base, root) if is_local_url(base) else posixpath.join(base, root)
    return Link(root=root, step=int(doc["step"]), meta=dict(doc.get("meta") or {}))


def remove_link(path: str, storage_options: dict | None = None) -> Link | None:
    """Remove the link at ``path``; the link it was (``None`` if none or not a link)."""
    try:
        old = read_link(path, storage_options)
    except FileNotFoundError:
        return None
    if old is not None:
        storage, spath = _storage_path(path, storage_options)
        storage.remove(spath)
    return old


class Links:
    """(chief) Links written once their step is committed, in the order they were asked
    for, on one background thread; ``policy`` is the retention rule that deletes steps
    whose link was replaced or removed (pass it as the Checkpointer's ``keep``)."""

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        on_commit: Callable[[str, CheckpointInfo], None] | None = None,
    ) -> None:
        self.storage_options = storage_options
        self.on_commit = on_commit
        self.unlinked: set[tuple[str, int]] = set()  # (root, step) no link reaches any more
        self.policy = Unlinked(self)
        self._ops: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def link_after_commit(self, handle: SaveHandle, path: str, root: str, meta: dict[str, Any]) -> None:
        def publish(info: CheckpointInfo) -> None:
            old = self._read_old(path)
            write_link(path, root, info.step, meta, self.storage_options)
            if old is not None and old.step != info.step:
                self.forget(old.root, old.step)
            if self.on_commit is not None:
                self.on_commit(path, info)

        self.after_commit(handle, publish)

    def after_commit(self, handle: SaveHandle, publish: Callable[[CheckpointInfo], None]) -> None:
        """Queue ``publish(info)`` for when the save behind ``handle`` is committed (a failed
        save raises in the queue instead: the Checkpointer reports it to every rank too)."""
        self._submit(lambda: publish(handle.wait()))

    def forget(self, root: str, step: int) -> None:
        """No link reaches ``step`` of ``root`` any more: retention may delete it."""
        with self._lock:
            self.unlinked.add((norm_url(root), step))

    def unlink(self, path: str) -> None:
        def op() -> None:
            old = remove_link(path, self.storage_options)
            if old is not None:
                self.forget(old.root, old.step)

        self._submit(op)

    def flush(self) -> None:
        """Every queued link written; raises the first error a link op met, once."""
        if self._thread is not None:
            done = threading.Event()
            self._ops.put(done.set)
            done.wait()
        err, self._error = self._error, None
        if err is not None:
            raise DistckptError(f"a checkpoint link could not be written: {err}") from err

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._ops.put(None)
                self._thread.join()
                self._thread = None

    def forget_unreachable(self, ckpt: Any, reachable: set[int]) -> None:
        """(at open, nothing pending) Hand to retention every committed step of ``ckpt`` that
        no link reaches: a crash between a commit and its link, or between a link's removal
        and the next commit, leaves such steps behind."""
        for info in ckpt.list():
            if info.step not in reachable:
                self.forget(ckpt.url, info.step)

    def _read_old(self, path: str) -> Link | None:
        try:
            return read_link(path, self.storage_options)
        except FileNotFoundError:
            return None

    def _submit(self, op: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="distckpt-links", daemon=True)
            self._thread.start()
        self._ops.put(op)

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            try:
                op()
            except BaseException as e:  # noqa: BLE001 - kept and raised by flush()
                log.error("checkpoint link: %s", e)
                if self._error is None:
                    self._error = e


def norm_url(url: str) -> str:
    """One spelling per root (absolute local paths), to compare roots."""
    return os.path.abspath(url.removeprefix("file://")) if is_local_url(url) else url.rstrip("/")


class Unlinked:
    """Retention: keep every step but those whose link was replaced or removed (for one root;
    ``for_root`` binds it). ``preserved`` still keeps the newest step and milestones."""

    def __init__(self, links: Links, root: str | None = None) -> None:
        self.links, self.root = links, root

    def for_root(self, root: str) -> Unlinked:
        return Unlinked(self.links, norm_url(root))

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        with self.links._lock:
            gone = {s for r, s in self.links.unlinked if r == self.root}
        return [c.step not in gone for c in checkpoints]
