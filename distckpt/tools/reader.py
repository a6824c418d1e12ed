"""``distckpt.open(url)``: read-only access to a checkpoint root, for tools and other jobs.

A ``CheckpointReader`` is the read side of the core, not a second implementation of it:
listing, step resolution and file checks are the root's ``Catalog`` (as in ``restore()``),
and tensor data goes through ``distckpt.dcp.read_items`` (the engines' read path). Nothing
here is a collective, takes the root's lease or deletes anything, so a reader may be opened
from a laptop while the training job writes to the same root. ``distckpt ls``, ``inspect``,
``verify``, ``gc``, ``export`` and ``distckpt.transfer`` are built on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..dcp import DCP_METADATA, METADATA_KEY, read_items
from ..errors import DistckptError, NoCheckpointError
from ..layout.catalog import Catalog, CheckpointInfo
from ..layout.commit import TMP_PREFIX, commit_for
from ..layout.lease import LOCK, holder_gone, lease_age, read_lease
from ..layout.manifest import MANIFEST, Manifest, parse_step_dirname
from ..layout.pointer import read_pointer
from ..layout.recycle import POOL
from ..storage import PosixStorage, Storage, is_local_url, open_storage
from ..tree import dtype_from_name
from .inspection import StepContents, saved_order, step_contents
from .verify import VerifyReport, verify_step


@dataclass(frozen=True)
class Leftover:
    """Uncommitted work under a root: never listed as a step, never restored."""

    path: str
    name: str
    kind: str  # "interrupted save", "interrupted delete", "step without manifest" or kept files (recycle.POOL)


class CheckpointReader:
    """Read-only access to a checkpoint root (or to one step, given the step's URL).

    ``list()`` committed steps, oldest first; ``leftovers()`` uncommitted work; ``inspect()``
    a step's tensors, sharding and objects; ``verify()`` sizes and checksums;
    ``read_tensors()`` tensor data in bounded batches. ``step=None`` means the step named in
    the URL, else the newest committed one.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self.storage: Storage = open_storage(url, self.storage_options)
        self.pinned: int | None = None
        names = self._names()
        if MANIFEST in names or DCP_METADATA in names:
            self._open_step_url(url, names)
            names = self._names()
        self.catalog = Catalog(self.storage, commit_for(self.storage))
        if not names and not self.storage.exists(self.root):
            raise NoCheckpointError(
                f"{self.url} does not exist; check the path or URL (and --storage-options / credentials "
                "for object stores)"
            )

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def root(self) -> str:
        return self.storage.root

    def _names(self) -> list[str]:
        try:
            return self.storage.listdir(self.root)
        except NotADirectoryError as e:
            raise DistckptError(
                f"{self.url} is a file, not a checkpoint directory; point at the directory that holds "
                "the step_* folders"
            ) from e

    def _open_step_url(self, url: str, names: list[str]) -> None:
        """A URL naming one step (``.../step_000000001200``) opens its root, pinned to that step."""
        if is_local_url(url):
            parent, name = os.path.split(self.root)
        else:
            parent, _, name = url.rstrip("/").rpartition("/")
        step = parse_step_dirname(name)
        if MANIFEST not in names or step is None or not parent:
            raise DistckptError(
                f"{self.url} is a plain torch.distributed.checkpoint folder (or a renamed step), not a "
                "distckpt checkpoint; load it with torch.distributed.checkpoint.load"
            )
        self.storage = open_storage(parent, self.storage_options)
        self.pinned = step

    def step_url(self, step: int) -> str:
        return self.catalog.step_url(step)

    # --- listing ----------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (a step with a damaged manifest is skipped)."""
        return self.catalog.list()

    def leftovers(self) -> list[Leftover]:
        """Uncommitted work: interrupted saves and deletes, step directories without a manifest."""
        out = []
        for path in self.catalog.leftovers():
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(TMP_PREFIX):
                kind = "interrupted save"
            elif parse_step_dirname(name) is not None:
                kind = "step without manifest"
            else:
                kind = "interrupted delete"
            out.append(Leftover(path, name, kind))
        pool = self.storage.join(self.root, POOL)
        if isinstance(self.storage, PosixStorage) and self.storage.listdir(pool):  # kept for the next save
            out.append(Leftover(pool, POOL, "files kept for the next save to write over"))
        return out

    def lease(self) -> dict[str, Any] | None:
        """The root's lease (which job writes here), with ``age_s`` and ``live``; None if free."""
        try:
            doc = read_lease(self.storage, self.storage.join(self.root, LOCK))
        except FileNotFoundError:
            return None
        if not doc:
            return {"job": "unknown (unreadable lease)", "age_s": 0.0, "live": True}
        return {**doc, "age_s": lease_age(doc), "live": holder_gone(doc) is None}

    def pointer(self, name: str = "latest") -> CheckpointInfo | None:
        """The step ``latest.json`` (or ``best.json``) names, checked against its manifest;
        ``None`` when there is none or it is stale. One small read, no listing: for tools
        and other jobs that poll a root. It can lag the newest commit (see
        ``distckpt.layout.pointer``); ``list()`` and ``resolve()`` go by the manifests."""
        return read_pointer(self.catalog, name)

    def resolve(self, step: int | None = None) -> int:
        """The step meant by ``step``: as given (must be committed), pinned, or the newest."""
        return self.catalog.resolve(self.pinned if step is None else step)

    # --- one step ---------------------------------------------------------------------

    def info(self, step: int | None = None) -> CheckpointInfo:
        return self.catalog.info(self.manifest(step))

    def manifest(self, step: int | None = None) -> Manifest:
        return self.catalog.read_manifest(self.resolve(step))

    def state(self, step: int | None = None) -> dict[str, Any]:
        """``state.json`` of a step, checked against its manifest."""
        step = self.resolve(step)
        return self.catalog.read_state(step, self.catalog.read_manifest(step))

    def inspect(self, step: int | None = None) -> StepContents:
        """Tensors (name, shape, dtype, bytes, which ranks' files hold which chunks), non-tensor
        objects and bytes per recoverable. Reads metadata only; never tensor data."""
        return step_contents(self.catalog, self.resolve(step))

    def verify(
        self, step: int | None = None, *, progress: Callable[[int], None] | None = None, threads: int = 4
    ) -> VerifyReport:
        """Check every file of a step against the manifest: present, same size, same checksum.

        ``progress(nbytes)`` is called (from worker threads) as bytes are checksummed. A
        damaged manifest is reported as a problem, not raised.
        """
        return verify_step(self.catalog, self.resolve(step), progress=progress, threads=threads)

    # --- tensor data ------------------------------------------------------------------

    def read_tensors(
        self, names: Iterable[str], step: int | None = None, *, batch_bytes: int = 1 << 30
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{fqn: cpu tensor}`` batches of about ``batch_bytes`` each, in ``names`` order.

        Each batch is read through DCP straight into freshly allocated CPU tensors (resharding
        whatever the ranks wrote into whole tensors); only one batch is alive at a time unless
        the caller keeps them. No process group is used.
        """
        step = self.resolve(step)
        state = self.catalog.read_state(step, self.catalog.read_manifest(step))
        table = state.get("tensors", {})
        stepdir = self.catalog.step_path(step)
        contiguous = state.get("layout") == "contiguous"
        for batch in _batches(list(names), table, batch_bytes):
            dest = {n: torch.empty(table[n]["shape"], dtype=dtype_from_name(table[n]["dtype"])) for n in batch}
            read_items(dest, self.storage, stepdir, group=None, contiguous=contiguous, metadata=state.get(METADATA_KEY))
            yield dest

    def tensor_table(self, step: int | None = None) -> dict[str, dict[str, Any]]:
        """``{fqn: {"shape", "dtype"}}`` of every tensor in a step, in the recoverables' order."""
        state = self.state(step)
        return {n: state["tensors"][n] for n in saved_order(state)}

    def __repr__(self) -> str:
        return f"CheckpointReader({self.url!r})"


def open(url: str, storage_options: dict[str, Any] | None = None) -> CheckpointReader:  # noqa: A001
    """Open a checkpoint root (or one step's URL) for reading: no process group, no lease,
    no clean-up. ``distckpt.open("s3://b/run7").list()`` is what ``distckpt ls`` shows."""
    return CheckpointReader(url, storage_options)


def _batches(names: list[str], table: dict[str, Any], batch_bytes: int) -> Iterator[list[str]]:
    missing = [n for n in names if n not in table]
    if missing:
        raise DistckptError(f"the checkpoint holds no tensor {missing[0]!r}; see `distckpt inspect`")
    batch: list[str] = []
    size = 0
    for n in names:
        spec = table[n]
        nbytes = math.prod(spec["shape"]) * dtype_from_name(spec["dtype"]).itemsize
        if batch and size + nbytes > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += nbytes
    if batch:
        yield batch
