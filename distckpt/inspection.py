"""Read-only views of a checkpoint root: what ``distckpt ls``, ``inspect`` and ``verify`` show.

``distckpt.open(url)`` returns a ``CheckpointReader``. Nothing here is a collective, takes the
root's lease or deletes anything, so a reader may be opened from a laptop while the training
job writes to the same root. ``inspect`` reads ``manifest.json``, ``state.json`` and DCP's
``.metadata`` (through the restricted unpickler), never tensor data; ``verify`` streams every
file through the checksum; ``read_tensors`` loads chosen tensors through DCP, a bounded batch
at a time (``distckpt export`` and ``distckpt.transfer`` build on it).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .catalog import Catalog
from .commit import TMP_PREFIX, commit_for
from .contents import (
    Chunk,
    FileProblem,
    Leftover,
    ObjectEntry,
    StepContents,
    TensorEntry,
    VerifyReport,
    objects_of,
)
from .dcp_io import DCP_METADATA, SafeLoadPlanner, load_dcp_metadata
from .engine import _unwrap_dcp_errors
from .errors import CorruptCheckpointError, DistckptError, NoCheckpointError
from .info import CheckpointInfo
from .lease import LOCK, holder_gone, lease_age, read_lease
from .manifest import MANIFEST, Manifest, parse_step_dirname
from .storage import Storage, open_storage
from .tree import dtype_from_name, tensor_refs


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

    # --- where ------------------------------------------------------------------------

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
        if "://" in url and not url.startswith("file://"):
            parent, _, name = url.rstrip("/").rpartition("/")
        else:
            parent, name = os.path.split(self.root)
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

    def resolve(self, step: int | None = None) -> int:
        """The step meant by ``step``: as given (must be committed), pinned, or the newest."""
        if step is None:
            step = self.pinned
        if step is not None:
            if self.catalog.is_committed(step):
                return step
            have = ", ".join(map(str, self.catalog.committed_steps()[-10:])) or "none"
            raise NoCheckpointError(
                f"step {step} is not a committed checkpoint in {self.url} (committed: {have}); "
                f"pick one from `distckpt ls {self.url}`"
            )
        for candidate in reversed(self.catalog.candidate_steps()):  # newest first: one check, usually
            if self.catalog.is_committed(candidate):
                return candidate
        raise NoCheckpointError(
            f"no committed checkpoint in {self.url}; see `distckpt ls {self.url}` "
            "(a garbage or empty directory, or the job has not saved yet)"
        )

    def info(self, step: int | None = None) -> CheckpointInfo:
        return self.catalog.info(self.manifest(step))

    def manifest(self, step: int | None = None) -> Manifest:
        return self.catalog.read_manifest(self.resolve(step))

    def state(self, step: int | None = None) -> dict[str, Any]:
        """``state.json`` of a step, checked against its manifest."""
        step = self.resolve(step)
        return self.catalog.read_state(step, self.catalog.read_manifest(step))

    def dcp_metadata(self, step: int, man: Manifest) -> Metadata | None:
        """DCP's ``.metadata``, size- and checksum-checked, through the restricted unpickler."""
        if DCP_METADATA not in man.files:
            return None
        data = self.catalog.read_checked(step, man, DCP_METADATA)
        return load_dcp_metadata(io.BytesIO(data), self.storage.join(self.catalog.step_path(step), DCP_METADATA))

    # --- inspect ----------------------------------------------------------------------

    def inspect(self, step: int | None = None) -> StepContents:
        """Tensors (name, shape, dtype, bytes, which ranks' files hold which chunks), non-tensor
        objects and bytes per recoverable. Reads metadata only; never tensor data."""
        step = self.resolve(step)
        man = self.catalog.read_manifest(step)
        state = self.catalog.read_state(step, man)
        md = self.dcp_metadata(step, man)
        chunks = _chunks_by_fqn(md, man)
        tensors = []
        table = state.get("tensors", {})
        for fqn in _saved_order(state):
            spec = table[fqn]
            shape = tuple(int(d) for d in spec["shape"])
            dtype = dtype_from_name(spec["dtype"])
            nbytes = math.prod(shape) * _itemsize(dtype)
            tensors.append(
                TensorEntry(fqn, fqn.split(".", 1)[0], shape, spec["dtype"], nbytes, tuple(chunks.get(fqn, ())))
            )
        objects = []
        for name, skeleton in state.get("recoverables", {}).items():
            objects.extend(objects_of(skeleton, name))
        for name, ranks in state.get("per_rank", {}).items():
            objects.append(ObjectEntry(name, "per-rank state", f"one entry per rank ({len(ranks or [])} ranks)"))
        sizes = {name: 0 for name in list(state.get("recoverables", {})) + list(state.get("per_rank", {}))}
        for t in tensors:
            sizes[t.recoverable] = sizes.get(t.recoverable, 0) + t.nbytes
        files = {n: {"size": r.size, "checksum": r.checksum, "rank": r.rank} for n, r in sorted(man.files.items())}
        return StepContents(self.catalog.info(man), tensors, objects, sizes, files, dict(man.versions))

    # --- verify -----------------------------------------------------------------------

    def verify(
        self, step: int | None = None, *, progress: Callable[[int], None] | None = None, threads: int = 4
    ) -> VerifyReport:
        """Check every file of a step against the manifest: present, same size, same checksum.

        ``progress(nbytes)`` is called (from worker threads) as bytes are checksummed. A
        damaged manifest is reported as a problem, not raised.
        """
        step = self.resolve(step)
        try:
            man = self.catalog.read_manifest(step)
        except CorruptCheckpointError as e:
            return VerifyReport(step, 0, 0, [FileProblem(step, MANIFEST, str(e))])
        stepdir = self.catalog.step_path(step)
        names = sorted(man.files)

        def check(name: str) -> str | None:
            return self.catalog.file_problem(step, man, name, progress=progress)

        with ThreadPoolExecutor(max(1, min(threads, len(names) or 1))) as pool:
            verdicts = list(pool.map(check, names))
        problems = [FileProblem(step, n, v) for n, v in zip(names, verdicts, strict=True) if v is not None]
        present = set(self.storage.listdir(stepdir))
        unlisted = sorted(present - set(names) - {MANIFEST})
        return VerifyReport(step, len(names), man.nbytes, problems, unlisted)

    # --- tensor data ------------------------------------------------------------------

    def read_tensors(
        self, names: Iterable[str], step: int | None = None, *, batch_bytes: int = 1 << 30
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{fqn: cpu tensor}`` batches of about ``batch_bytes`` each, in ``names`` order.

        Each batch is read by DCP straight into freshly allocated CPU tensors (resharding
        whatever the ranks wrote into whole tensors); only one batch is alive at a time unless
        the caller keeps them. No process group is used.
        """
        step = self.resolve(step)
        man = self.catalog.read_manifest(step)
        state = self.catalog.read_state(step, man)
        table = state.get("tensors", {})
        stepdir = self.catalog.step_path(step)
        contiguous = state.get("layout") == "contiguous"
        for batch in _batches(list(names), table, batch_bytes):
            dest = {n: torch.empty(table[n]["shape"], dtype=dtype_from_name(table[n]["dtype"])) for n in batch}
            with _unwrap_dcp_errors(f"reading {stepdir}", CorruptCheckpointError):
                dcp.load(
                    dest,
                    storage_reader=self.storage.dcp_reader(stepdir, contiguous),
                    planner=SafeLoadPlanner(),
                    no_dist=True,
                )
            yield dest

    def tensor_table(self, step: int | None = None) -> dict[str, dict[str, Any]]:
        """``{fqn: {"shape", "dtype"}}`` of every tensor in a step, in the recoverables' order."""
        state = self.state(step)
        return {n: state["tensors"][n] for n in _saved_order(state)}

    def __repr__(self) -> str:
        return f"CheckpointReader({self.url!r})"


def open(url: str, storage_options: dict[str, Any] | None = None) -> CheckpointReader:  # noqa: A001
    """Open a checkpoint root (or one step's URL) for reading: no process group, no lease,
    no clean-up. ``distckpt.open("s3://b/run7").list()`` is what ``distckpt ls`` shows."""
    return CheckpointReader(url, storage_options)


# --- helpers --------------------------------------------------------------------------------


def _saved_order(state: dict[str, Any]) -> list[str]:
    """Tensor names in the recoverables' own order (a module's state_dict order), not DCP's."""
    table = state.get("tensors", {})
    refs = [r for skeleton in state.get("recoverables", {}).values() for r in tensor_refs(skeleton)]
    ordered = list(dict.fromkeys(r for r in refs if r in table))
    return ordered + [n for n in table if n not in set(ordered)]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _batches(names: list[str], table: dict[str, Any], batch_bytes: int) -> Iterator[list[str]]:
    missing = [n for n in names if n not in table]
    if missing:
        raise DistckptError(f"the checkpoint holds no tensor {missing[0]!r}; see `distckpt inspect`")
    batch: list[str] = []
    size = 0
    for n in names:
        spec = table[n]
        nbytes = math.prod(spec["shape"]) * _itemsize(dtype_from_name(spec["dtype"]))
        if batch and size + nbytes > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += nbytes
    if batch:
        yield batch


def _chunks_by_fqn(md: Metadata | None, man: Manifest) -> dict[str, list[Chunk]]:
    """Each tensor's stored chunks, with the file that holds it and the rank that wrote that file."""
    if md is None:
        return {}
    files: dict[tuple[str, tuple[int, ...]], str] = {}
    for index, info in md.storage_data.items():
        files[(index.fqn, tuple(index.offset or ()))] = str(info.relative_path)
    out: dict[str, list[Chunk]] = {}
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        for c in item.chunks:
            key = (fqn, tuple(c.offsets))
            name = files.get(key, "?")
            rec = man.files.get(name)
            out.setdefault(fqn, []).append(
                Chunk(tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes), name, rec.rank if rec else -1)
            )
    return out
