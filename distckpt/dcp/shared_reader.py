"""Restores that read every byte of a step from storage once, whatever the number of ranks.

Every rank knows which stored items it needs: from ``state.json``'s index when its tensors
are plain and stored whole (``direct``, ``read_direct``), else from DCP's load plan (so
resharding works unchanged; ``read_data``). Then, instead of each rank reading what it
needs (in chief mode and DDP every rank needs everything: N ranks read the checkpoint N
times), the ranks agree on who reads what (one ``all_gather`` of file names;
``read_schedule.schedule``):

* a file that one rank needs is read by that rank alone (FSDP: every rank its own shards);
* a file that several ranks need is read by one rank - the one with the fewest bytes to
  read so far, so the files are striped over the ranks - and streamed in chunks that are
  broadcast over the job's gloo group; chunks of different files alternate, so the readers
  read at the same time, each ahead of the broadcasts on a thread of its own.

Every file is read whole and in order, and checksummed (XXH3, against the manifest) in the
same pass: no second read to verify (unchecksummed, long stretches no rank needs are
skipped). An item is located without reading anything: the index records where each item's
data starts. For a step written before it did, distckpt's frames (``writer.frame``) tell:
the data starts right after a frame head that depends only on its dtype and shape; the
head's bytes are compared as they stream by, and an item whose head differs (a checkpoint
from another writer or torch) is read again through DCP's own item loop, never taken on
trust. A file read by one rank is read in place with scatter reads (``scatter``): every
item's data straight into its destination tensor. So is a chunk of a shared file that lies
inside one item's data, on the rank that reads it and on those that receive it.

On a node-local tier (``NodeLocal``: each node holds only some files, e.g. in ``/dev/shm``)
the trade-off is the other way round: reading a node's memory is cheap and the network is
not. Every rank that needs a file its node holds reads it itself; a rank whose node lacks
it receives it point to point from a rank that holds it, and no other rank takes part.

Errors never stop a rank in the middle of the schedule (the others would wait on its next
broadcast): a failed read streams zeros in its place, and every problem - I/O error,
checksum mismatch - is raised at the end, on the rank that found it; the caller's
collective error handling makes every rank fall back together.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from ..errors import CorruptCheckpointError
from ..layout.manifest import Checksum, FileRecord
from ..storage import Storage, read_exactly
from .direct import Direct
from .file_items import Item, ItemFile
from .fs import StorageFS, StorageReader
from .read_schedule import CHUNK, Chunk, schedule
from .scatter import LONG_PIECE, PIECE, SKIP, batches, fd_of, read_batch, sequential
from .writer import frame

_AHEAD = 3  # chunks a reader may read ahead of the broadcasts


@dataclasses.dataclass
class ReadCounter:
    """Bytes and read calls this reader asked of storage (for stats and the benchmark)."""

    bytes: int = 0
    reads: int = 0
    files: int = 0
    broadcast_bytes: int = 0  #: bytes received from other ranks
    in_place: int = 0  #: of those, received straight into their tensors (no copy)
    read_in_place: int = 0  #: bytes of files shared with other ranks read straight into tensors


@dataclasses.dataclass
class NodeLocal:
    """Where the files of a step live on a node-local tier: ``holders``, the ranks (of the
    reading group) whose node holds each file; ``paths``, where this rank finds the files its
    node holds (its own copy of the step, or a replica it keeps for a partner); ``given``,
    small files its node lacks (DCP's ``.metadata``), as another rank sent them."""

    holders: dict[str, set[int]]
    paths: dict[str, str]
    given: dict[str, bytes] = dataclasses.field(default_factory=dict)


class SharedReader(StorageReader):
    """DCP's reader (restricted metadata unpickling included) that reads each file once across
    ``group`` (None: this rank alone) and checks it against ``files`` (the manifest's records;
    None: no checksums)."""

    def __init__(
        self,
        storage: Storage,
        path: str,
        *,
        group: Any = None,
        files: dict[str, FileRecord] | None = None,
        threads: int = 4,
        node_local: NodeLocal | None = None,
    ) -> None:
        super().__init__(storage, path)
        self.storage_, self.group, self.files, self.threads = storage, group, files, max(1, threads)
        self.node_local = node_local
        if node_local is not None:  # DCP's own reads (metadata, items) find the files too
            self.fs = StorageFS(
                storage,
                moved={storage.join(path, n): p for n, p in node_local.paths.items()},
                given={storage.join(path, n): data for n, data in node_local.given.items()},
            )
        self.counter = ReadCounter()
        self._md: Metadata | None = None
        self._lock = threading.Lock()

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._md = metadata

    # --- the plan ------------------------------------------------------------------------

    def read_direct(self, direct: Direct) -> None:
        """Fill the tensors of a load planned from the index, not by DCP (``direct.plan``).
        Every rank runs the whole schedule; then the first problem found here is raised."""
        errors = self._read(direct.files)
        if errors:
            raise errors[0]
        short = [(name, i.start) for name, f in direct.files.items() for i in f.items if i.got != i.nbytes]
        if short:
            raise CorruptCheckpointError(f"{short[0][0]}: the item at byte {short[0][1]} was not read whole")
        direct.finish()

    def read_data(self, plan: Any, planner: Any) -> Future:
        mine: dict[str, list[Item]] = defaultdict(list)
        rest = []  # items that are not plain tensors: DCP's own item loop
        by_index: dict[Any, list[Any]] = defaultdict(list)
        for req in plan.items:
            by_index[req.storage_index].append(req)
        for index, reqs in by_index.items():
            item = self._item(index, reqs, planner)
            if item is None:
                rest += reqs
            else:
                mine[self.storage_data[index].relative_path].append(item)
        files = {name: ItemFile(items) for name, items in mine.items()}
        errors = self._read(files)
        slow = [req for f in files.values() for item in f.items if not self._finish(item, planner) for req in item.reqs]
        if errors:
            raise errors[0]
        if rest or slow:
            return super().read_data(dataclasses.replace(plan, items=rest + slow), planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _item(self, index: Any, reqs: list[Any], planner: Any) -> Item | None:
        spec = self._source_spec(index)
        if spec is None or any(r.type != LoadItemType.TENSOR for r in reqs):
            return None
        dtype, shape = spec
        info = self.storage_data[index]
        head, tail = frame(dtype, shape)
        nbytes = shape.numel() * dtype.itemsize
        if info.length != len(head) + nbytes + len(tail):
            return None
        item = Item(info.offset, head, info.offset + len(head), nbytes, reqs)
        if len(reqs) == 1 and nbytes:
            req = reqs[0]
            target = planner.resolve_tensor(req)
            whole = req.lengths == shape and not any(req.storage_offsets)
            if whole and target.shape == shape and target.dtype == dtype and target.device.type == "cpu":
                if target.is_contiguous():
                    item.dst = target.detach().view(-1).view(torch.uint8).numpy()
        return item

    def _source_spec(self, index: Any) -> tuple[torch.dtype, torch.Size] | None:
        item = self._md.state_dict_metadata.get(index.fqn) if self._md else None
        for chunk in getattr(item, "chunks", None) or []:
            if tuple(chunk.offsets) == tuple(index.offset or ()):
                return item.properties.dtype, torch.Size(chunk.sizes)
        return None

    def _finish(self, item: Item, planner: Any) -> bool:
        """Move an assembled item into its destinations; False when it must be read by DCP."""
        if bytes(item.seen_head) != item.head or item.got != item.nbytes:
            return False
        for req in item.reqs:
            target = planner.resolve_tensor(req)
            if item.dst is None:
                spec = self._source_spec(req.storage_index)
                assert spec is not None
                src = item.tmp.view(spec[0]).view(spec[1]) if item.tmp is not None else torch.empty(0, dtype=spec[0])
                target.detach().copy_(narrow_tensor_by_index(src, req.storage_offsets, req.lengths))
            planner.commit_tensor(req, target)
        item.tmp = None
        return True

    # --- who reads what ---------------------------------------------------------------------

    def _read(self, files: dict[str, ItemFile]) -> list[BaseException]:
        """Read every file this rank needs; returns the problems found (never raises midway)."""
        sizes = {name: self._size(name) for name in files}
        if self.group is None:
            needs = [sizes]
            rank = 0
        else:
            needs = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(needs, sizes, group=self.group)
            rank = dist.get_rank(self.group)
        own, shared = schedule(needs, self.node_local.holders if self.node_local else None)
        errors: list[BaseException] = []
        worker = threading.Thread(target=self._read_solo, args=(own[rank], files, errors), name="distckpt-read")
        worker.start()
        try:
            if shared:
                self._stream_shared(shared, files, rank, errors)
        finally:
            worker.join()
        return errors

    def _where(self, name: str) -> str:
        path = self.storage_.join(str(self.path), name)
        return self.fs.moved.get(path, path)  # node-local: in a replica

    def _size(self, name: str) -> int:
        rec = (self.files or {}).get(name)
        return rec.size if rec is not None else self.storage_.size(self._where(name))

    def _open(self, name: str) -> tuple[Any, Checksum | None]:
        with self._lock:
            self.counter.files += 1
        f = self.storage_.open_read(self._where(name))
        sequential(f)  # read start to end, whichever path reads it
        return f, (Checksum() if self.files is not None and name in self.files else None)

    def _readinto(self, f: Any, view: memoryview, hasher: Checksum | None) -> None:
        for at in range(0, len(view), PIECE):
            piece = view[at : at + PIECE]
            read_exactly(f, piece)
            if hasher is not None:
                hasher.update(piece)
        with self._lock:
            self.counter.bytes += len(view)
            self.counter.reads += 1

    def _gone(self, name: str, f: Any) -> CorruptCheckpointError | None:
        """After the last read of a local file (or a failed one): the error to raise if it is
        not the step's file any more. Retention of a job writing to this root may have deleted
        the step meanwhile, and a deleted step's files are written over by the next save
        (``layout/recycle.py``); a file still in place once its last byte has been read was
        read before any of that."""
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return None  # object stores: a deleted object is not rewritten in place
        where = self._where(name)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(where))
        except FileNotFoundError:
            same = False
        if same:
            return None
        return CorruptCheckpointError(
            f"{name}: the step was deleted while it was being read (retention of the job that writes to "
            f"{self.storage_.url}); restore again to read a step that is kept"
        )

    def _check(self, name: str, hasher: Checksum | None) -> None:
        rec = (self.files or {}).get(name)
        if hasher is None or rec is None:
            return
        if hasher.size != rec.size or hasher.hexdigest() != rec.checksum:
            raise CorruptCheckpointError(
                f"{name}: checksum mismatch while loading ({Checksum.name} {hasher.hexdigest()} over {hasher.size} "
                f"bytes, manifest {rec.checksum} over {rec.size}): the file is corrupt"
            )

    # --- a file only this rank needs: read in order, big items straight into place ---------

    def _read_solo(self, names: list[str], files: dict[str, ItemFile], errors: list[BaseException]) -> None:
        threads = [
            threading.Thread(target=self._solo_files, args=(names[i :: self.threads], files, errors))
            for i in range(1, min(self.threads, len(names)))
        ]
        for t in threads:
            t.start()
        self._solo_files(names[:: self.threads] if threads else names, files, errors)
        for t in threads:
            t.join()

    def _solo_files(self, names: list[str], files: dict[str, ItemFile], errors: list[BaseException]) -> None:
        scratch, stage = memoryview(bytearray(SKIP)), memoryview(bytearray(PIECE))
        for name in names:
            try:
                self._solo_file(name, files[name], scratch, stage)
            except BaseException as e:  # noqa: BLE001 - reported at the end, on this rank
                errors.append(e if isinstance(e, CorruptCheckpointError) else _explain(name, e))

    def _solo_file(self, name: str, file: ItemFile, scratch: memoryview, stage: memoryview) -> None:
        """Read in place (``scatter``): frame heads, data straight into the tensors."""
        f, hasher = self._open(name)
        with f:
            try:
                fd = fd_of(f)
                piece = LONG_PIECE if fd is not None and hasher is None else PIECE  # stage holds PIECE
                spans = file.spans(self._size(name))
                for at, views in batches(spans, scratch, whole=hasher is not None, piece=piece):
                    read_batch(f, fd, at, views, stage)
                    nbytes = 0
                    for view in views:
                        nbytes += len(view)
                        if hasher is not None:
                            hasher.update(view)
                    with self._lock:
                        self.counter.bytes += nbytes
                        self.counter.reads += 1
            except OSError as e:
                if gone := self._gone(name, f):
                    raise gone from e
                raise
            if gone := self._gone(name, f):
                raise gone
        self._check(name, hasher)
        file.read()

    # --- files several ranks need: one reads, everyone receives ------------------------------

    def _stream_shared(
        self, shared: list[Chunk], files: dict[str, ItemFile], rank: int, errors: list[BaseException]
    ) -> None:
        """``shared``: the global order of the chunks sent between ranks (the same on every
        rank, so the sends and receives of every pair of ranks match up)."""
        shared = [c for c in shared if c.to is None or rank == c.src or rank in c.to]
        mine = [c for c in shared if c.src == rank]
        ready: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        size = max((c.end - c.start for c in mine), default=0)
        for _ in range(min(_AHEAD, len(mine))):  # reused: fresh pages would cost more than the read
            free.put(torch.empty(size, dtype=torch.uint8))
        reader = threading.Thread(
            target=self._produce, args=(mine, files, free, ready, errors), name="distckpt-read-shared"
        )
        reader.start()
        recv = torch.empty(min(CHUNK, max((c.end - c.start for c in shared if c.src != rank), default=0)),
                           dtype=torch.uint8)  # fmt: skip
        try:
            for c in shared:
                # a chunk inside one item's data is read (by its reader) or received (by the
                # others) straight into that item's tensor: no copy through a buffer
                if c.src == rank:
                    full, landing = ready.get()
                    buf = full[: c.end - c.start] if landing is None else landing[1]
                else:
                    full, landing = recv, files[c.name].landing(c.start, c.end) if c.name in files else None
                    buf = recv[: c.end - c.start] if landing is None else landing[1]
                if c.to is None:  # everyone: a broadcast
                    dist.broadcast(buf, src=dist.get_global_rank(self.group, c.src), group=self.group)
                elif c.src == rank:
                    for work in [dist.isend(buf, group=self.group, group_dst=d) for d in c.to]:
                        work.wait()
                else:
                    dist.recv(buf, group=self.group, group_src=c.src)
                if c.src != rank:
                    with self._lock:
                        self.counter.broadcast_bytes += c.end - c.start
                if landing is not None:
                    landing[0].got += c.end - c.start  # the head is checked in _finish, as for all
                    with self._lock:
                        if c.src != rank:
                            self.counter.in_place += c.end - c.start
                        else:
                            self.counter.read_in_place += c.end - c.start
                elif c.name in files:
                    files[c.name].feed(c.start, memoryview(buf.numpy()))
                if c.src == rank and landing is None:
                    free.put(full)
        finally:
            while reader.is_alive():  # a failed send: let the reader thread finish
                free.put(torch.empty(size, dtype=torch.uint8))
                reader.join(timeout=0.1)

    def _produce(
        self,
        chunks: list[Chunk],
        files: dict[str, ItemFile],
        free: queue.Queue,
        ready: queue.Queue,
        errors: list[BaseException],
    ) -> None:
        """(reader thread) This rank's chunks, in broadcast order, read ahead into ``ready``
        as ``(buffer, None)``, or ``(None, (item, view))`` when read straight into an item's
        tensor (a chunk inside its data; its frame head is checked with the rest in ``_finish``)."""
        open_files: dict[str, tuple[Any, Checksum | None]] = {}
        failed: set[str] = set()
        last = {c.name: c.end for c in chunks}
        for name, start, end, *_ in chunks:
            landing = files[name].inside(start, end) if name in files else None
            buf = free.get() if landing is None else landing[1]
            view = memoryview(buf[: end - start].numpy())
            if name not in failed:
                try:
                    if name not in open_files:
                        open_files[name] = self._open(name)
                    f, hasher = open_files[name]
                    self._readinto(f, view, hasher)
                    if end == last[name]:
                        if gone := self._gone(name, f):
                            raise gone
                        f.close()
                        self._check(name, open_files.pop(name)[1])
                except BaseException as e:  # noqa: BLE001 - the broadcasts go on; reported at the end
                    failed.add(name)
                    gone = self._gone(name, open_files[name][0]) if name in open_files else None
                    errors.append(gone or (e if isinstance(e, CorruptCheckpointError) else _explain(name, e)))
                    buf.zero_()
            else:
                buf.zero_()
            ready.put((buf, None) if landing is None else (None, landing))
        for f, _ in open_files.values():
            f.close()


def _explain(name: str, e: BaseException) -> CorruptCheckpointError:
    err = CorruptCheckpointError(f"{name}: reading failed ({type(e).__name__}: {e})")
    err.__cause__ = e
    return err
