"""A DCP storage writer that feeds the disk straight from memory: no ``torch.save`` per item.

DCP's ``FileSystemWriter`` runs ``torch.save`` on every item: each byte goes through torch's
zip writer and its CRC32 on threads that hold the GIL. Yet the container around a tensor
(a small zip: the pickled tensor description, byte order, version, and one stored record
holding the raw bytes) depends only on the tensor's dtype and shape. ``FastWriter`` builds
that frame once per (dtype, shape) with ``torch.serialization.skip_data`` - torch's own
writer, with the data left out - and then writes each item as frame prefix, the tensor's
bytes taken directly from its memory (the staging pool), frame suffix. The result is
byte-for-byte the layout ``torch.save`` produces (the data record's CRC32 field is left
empty, which ``torch.load`` accepts), so plain ``dcp.load`` reads it; the XXH3 checksum of
each file is computed on the same pass, and the big writes release the GIL.

To local disk the items are not quite back to back: ``write_files`` places each item of
1 MB or more so that its data starts at a file offset congruent to its memory address
modulo 4 KB (a gap of zeros before it, recorded nowhere but in the offsets of DCP's
metadata, which never reads the gaps), and the file is written with ``O_DIRECT``: the disk
reads the tensor where it lies (``write_process``). Staged tensors are written by the
writer process, live ones (a synchronous save) by threads here.

A tensor that is not a contiguous CPU tensor (a strided view, a CUDA tensor written without
staging) goes the old way, through ``fs``'s streams, copied into a contiguous one first, as
DCP copies views; every item on disk is plain row-major data.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..arena import find_arena, local_part, shared_arenas
from ..gc_paused import gc_resumed
from ..layout import recycle
from ..storage import PosixStorage, Storage
from .fs import StorageWriter
from .plan_cache import Seen
from .write_child import ALIGN_MIN, BLOCK, GAP, write_direct, write_parts
from .write_process import WRITER, Program, WriterProcessError

_SUFFIX = ".distcp"
_SMALL = 64 << 10  # items up to this size are joined with their frame into one write
_PER_THREAD = 64 << 20  # a writer thread only pays off for this many bytes (the GIL)
_frames: dict[tuple[torch.dtype, tuple[int, ...]], tuple[bytes, bytes]] = {}
_frames_lock = threading.Lock()


def frame(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The bytes ``torch.save`` writes before and after a contiguous tensor's data."""
    key = (dtype, tuple(shape))
    cached = _frames.get(key)  # a dict read is atomic; the lock guards the misses
    if cached is not None:
        return cached
    size = torch.Size(shape).numel() * dtype.itemsize
    sink = _Sparse() if size else io.BytesIO()  # skip_data seeks over the data: no need to hold it
    with _frames_lock, torch.serialization.skip_data():  # skip_data is process-wide state
        torch.save(torch.empty(shape, dtype=dtype), sink)
    if isinstance(sink, _Sparse):
        framed, nbytes = sink.around_hole()
    else:
        raw = sink.getvalue()
        start, nbytes = _data_span(raw)
        framed = (raw[:start], raw[start + nbytes :])
    if nbytes != size:
        raise RuntimeError(f"torch.save wrote {nbytes} data bytes for a {dtype} {list(shape)} tensor")
    with _frames_lock:
        _frames[key] = framed
    return framed


class _Sparse:
    """A file for ``torch.save`` under ``skip_data``, which seeks over each record's data: it
    keeps what is written and leaves the hole unfilled (a BytesIO fills it with zeros - the
    tensor's whole size allocated and written, for a few hundred bytes of frame)."""

    def __init__(self) -> None:
        self.pos, self.end = 0, 0
        self.parts: dict[int, bytes] = {}

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.parts[self.pos] = data
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.end}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def around_hole(self) -> tuple[tuple[bytes, bytes], int]:
        """The bytes before and after the one stretch never written (the data), and its size."""
        at, holes = 0, []
        for pos in sorted(self.parts):
            if pos > at:
                holes.append((at, pos))
            at = max(at, pos + len(self.parts[pos]))
        if len(holes) != 1:
            raise RuntimeError(f"torch.save skipped {len(holes)} stretches, expected one data record")
        start, stop = holes[0]
        head, tail = bytearray(start), bytearray(self.end - stop)
        for pos, data in self.parts.items():
            if pos < start:
                head[pos : pos + len(data)] = data
            else:
                tail[pos - stop : pos - stop + len(data)] = data
        return (bytes(head), bytes(tail)), stop - start


def _data_span(raw: bytes) -> tuple[int, int]:
    """Offset and size of the single data record inside a ``torch.save`` zip."""
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        (rec,) = [i for i in zf.infolist() if "/data/" in i.filename]
    name_len, extra_len = struct.unpack("<HH", raw[rec.header_offset + 26 : rec.header_offset + 30])
    return rec.header_offset + 30 + name_len + extra_len, rec.file_size


class FastWriter(StorageWriter):
    """``StorageWriter`` whose ``write_data`` frames items itself (see the module doc).
    ``layout`` records what went where: ``[(file name, [fqn, ...])]`` (``plan_cache``)."""

    def __init__(self, storage: Storage, path: str, thread_count: int) -> None:
        super().__init__(storage, path, thread_count)
        self.thread_count = max(1, thread_count)
        self.layout: list[tuple[str, list[str]]] = []
        self.placed: list[list[tuple[int, int]]] = []  # each file's items as (offset, length)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix
        buckets = [b for b in _buckets(plan.items, self.thread_count) if b]
        jobs = [(f"{prefix}{i}{_SUFFIX}", bucket) for i, bucket in enumerate(buckets)]
        self.layout = [(name, [item.index.fqn for item in items]) for name, items in jobs]
        if any(item.type == WriteItemType.BYTE_IO for item in plan.items):
            raise ValueError("distckpt hands DCP tensors only; a non-tensor value reached the writer")
        files = [(name, [planner.resolve_data(item) for item in items]) for name, items in jobs]
        self.placed = placed = write_files(self.fs, self.path, files)
        results = []
        for (name, items), spans in zip(jobs, placed, strict=True):
            for item, (offset, length) in zip(items, spans, strict=True):
                info = _StorageInfo(name, offset, length)
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=info))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut


def write_files(
    fs: Any, directory: str, files: list[tuple[str, list[torch.Tensor]]], seen: Seen | None = None
) -> list[list[tuple[int, int]]]:
    """Write each ``(name, tensors)`` framed into ``directory/name`` through ``fs`` (a
    ``StorageFS``: durable, checksummed); returns each file's items as ``(offset, length)``.

    To local disk, each big item's data is placed at a file offset congruent to its address
    modulo the O_DIRECT block (a gap of < 4 KB before it; DCP reads items by offset, never
    the gaps), so the disk reads it in place (``write_child.write_direct``): tensors staged
    in shared host arenas by the writer process, other CPU tensors (a synchronous save's live
    ones) by threads of this process. Anything else (object stores, CUDA or strided
    tensors) is written back to back through ``fs``'s streams by threads.

    ``seen``: what was derived from these very staging views for this plan last time
    (``plan_cache.Seen``), used and filled in here."""
    if isinstance(fs.storage, PosixStorage) and fs.recorder is not None:
        placed = seen.placement if seen is not None else None
        if placed is None:
            placed = _place(files)
            if seen is not None:
                seen.placement = placed
        if placed is not None:
            threads = writer_threads(placed.nbytes, len(files))
            paths = [fs.concat_path(directory, name) for name, _ in files]
            recycle.take(fs.storage, paths)  # written over: no new blocks to allocate
            with gc_resumed():  # the data: long, few objects, training may be running beside it
                if _by_process() and placed.in_arenas:
                    written = _by_writer_process(fs, paths, placed, threads)
                else:
                    written = _by_direct_threads(fs, paths, placed.files, threads)
            return _record(fs, paths, placed.files, written)
    nbytes = sum(t.nbytes for _, tensors in files for t in tensors)
    calls = [functools.partial(write_file, fs, directory, name, tensors) for name, tensors in files]
    with gc_resumed():
        written_lengths = run_parallel(calls, writer_threads(nbytes, len(files)))
    return [_back_to_back(lengths) for lengths in written_lengths]


def _back_to_back(lengths: list[int]) -> list[tuple[int, int]]:
    spans, offset = [], 0
    for length in lengths:
        spans.append((offset, length))
        offset += length
    return spans


def _by_process() -> bool:
    """``DISTCKPT_WRITE_PROCESS=0`` keeps every write in this process (to compare, or where
    starting a process is not allowed)."""
    return os.environ.get("DISTCKPT_WRITE_PROCESS", "1") != "0"


#: a placed file: its entries in order - bytes (a frame), an int (a gap of that many zero
#: bytes), or ``(tensor, arena or None, offset in the arena)`` - and its items' spans
_Placed = tuple[list[Any], list[tuple[int, int]]]


@dataclass
class Placement:
    """Every file of a save laid out for O_DIRECT (``_place``): its entries, the bytes of
    tensor data, whether all of it lies in shared arenas, and - made on first use - the
    writer process's program for it."""

    files: list[_Placed]
    nbytes: int
    in_arenas: bool
    program: Program | None = None


def _place(files: list[tuple[str, list[torch.Tensor]]]) -> Placement | None:
    """Every file laid out for O_DIRECT, or None when a tensor is not contiguous host memory."""
    arenas = list(shared_arenas().values())
    out, nbytes, in_arenas = [], 0, True
    for _, tensors in files:
        entries: list[Any] = []
        spans, pos = [], 0
        for t in tensors:
            t = local_part(t).detach()
            if t.device.type != "cpu" or not t.is_contiguous():
                return None
            head, tail = frame(t.dtype, tuple(t.shape))
            where = find_arena(t, arenas) if t.nbytes else None
            if t.nbytes:
                nbytes += t.nbytes
                in_arenas = in_arenas and where is not None
            gap = gap_before(pos + len(head), t.data_ptr(), t.nbytes)
            entries += [gap, head, (t, *(where or (None, 0))), tail]
            spans.append((pos + gap, len(head) + t.nbytes + len(tail)))
            pos += gap + len(head) + t.nbytes + len(tail)
        out.append((entries, spans))
    return Placement(out, nbytes, in_arenas)


def gap_before(data_at: int, address: int, nbytes: int) -> int:
    """Zero bytes before an item whose data would start at file offset ``data_at`` so that
    it starts at one congruent to its memory ``address`` modulo the O_DIRECT block (big
    items only: the gap is < 4 KB)."""
    return (address - data_at) % BLOCK if nbytes >= ALIGN_MIN else 0


def _by_writer_process(fs: Any, paths: list[str], placed: Placement, threads: int) -> list[tuple[int, str]]:
    if placed.program is None:
        files, arenas = [], {}
        for entries, _ in placed.files:
            segments: list[Any] = []
            for e in entries:
                if isinstance(e, tuple):
                    t, arena, offset = e
                    if t.nbytes:
                        arenas[arena.id] = arena
                        segments.append((arena.id, offset, t.nbytes))
                elif isinstance(e, bytes):
                    segments.append(e)
                elif e:
                    segments.append((GAP, 0, e))
            files.append(segments)
        placed.program = Program.of(files, arenas)
    try:
        return WRITER.write_program(paths, placed.program, threads)
    except OSError as e:
        fs.recorder.os_errors.append(e)
        raise


def _by_direct_threads(fs: Any, paths: list[str], placed: list[_Placed], threads: int) -> list[tuple[int, str]]:
    def one(path: str, entries: list[Any]) -> tuple[int, str]:
        try:  # parts are made as they are written: a small item's joined copy lives briefly
            return write_direct(path, _parts(entries)) or write_parts(path, _parts(entries))
        except OSError as e:
            fs.recorder.os_errors.append(e)
            raise

    calls = [functools.partial(one, path, entries) for path, (entries, _) in zip(paths, placed, strict=True)]
    return run_parallel(calls, threads)


def _parts(entries: list[Any]) -> Iterator[tuple[memoryview, int | None]]:
    """A placed file's bytes to write, with each big tensor's address modulo the block; a
    small item is joined with its frame into one part (one checksum update, one copy)."""
    for i in range(0, len(entries), 4):  # _place emits gap, head, tensor, tail per item
        gap, head, (t, _, _), tail = entries[i : i + 4]
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.nbytes else memoryview(b"")
        if gap:
            yield memoryview(bytes(gap)), None
        if t.nbytes < ALIGN_MIN:
            yield memoryview(b"".join((head, data, tail))), None
        else:
            yield memoryview(head), None
            yield data, t.data_ptr() % BLOCK
            yield memoryview(tail), None


def _record(
    fs: Any, paths: list[str], placed: list[_Placed], written: list[tuple[int, str]]
) -> list[list[tuple[int, int]]]:
    for path, (_, spans), (size, digest) in zip(paths, placed, written, strict=True):
        expected = spans[-1][0] + spans[-1][1] if spans else 0
        if size != expected:
            raise WriterProcessError(f"{size} bytes were written into {path}, expected {expected}")
        fs.recorder.put(path, size, digest)
    return [spans for _, spans in placed]


def write_file(fs: Any, directory: str, name: str, tensors: Iterable[torch.Tensor]) -> list[int]:
    """Write ``tensors`` framed, back to back, into ``directory/name`` through ``fs`` (DCP's
    ``FileSystemBase``: durable on close, checksummed); returns each item's length."""
    lengths = []
    with fs.create_stream(fs.concat_path(directory, name), "wb") as stream:
        for tensor in tensors:
            lengths.append(_write_tensor(stream, tensor))
    return lengths


def _write_tensor(stream: Any, data: torch.Tensor) -> int:
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    exact = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.dtype.itemsize
    if not (tensor.is_contiguous() and tensor.storage_offset() == 0 and exact):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    head, tail = frame(tensor.dtype, tuple(tensor.shape))
    nbytes = tensor.numel() * tensor.dtype.itemsize
    data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if nbytes else b""
    if nbytes <= _SMALL:  # one write (and one checksum update) instead of three
        stream.write(b"".join((head, data, tail)))
    else:
        stream.write(head)
        stream.write(data)  # straight from the tensor's memory; the GIL is released while it lands
        stream.write(tail)
    return len(head) + nbytes + len(tail)


def run_parallel(calls: list[Callable[[], Any]], threads: int) -> list[Any]:
    """Each call's result, in order, from ``threads`` plain threads; the first error is raised.
    Plain threads, not an executor: a save flushed at interpreter exit (atexit) must still
    run, and ``concurrent.futures`` refuses new work once shutdown has begun."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    todo = iter(range(len(calls)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None or errors:
                return
            try:
                results[i] = calls[i]()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors.append(e)

    workers = [threading.Thread(target=worker, name="distckpt-write") for _ in range(max(1, threads) - 1)]
    for w in workers:
        w.start()
    worker()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return results


def writer_threads(nbytes: int, files: int) -> int:
    """Threads that pay off for ``nbytes`` in ``files``: for small states the GIL makes more
    threads slower, not faster."""
    return max(1, min(files, nbytes // _PER_THREAD))


def _buckets(items: list[WriteItem], n: int) -> list[list[WriteItem]]:
    """Items spread over ``n`` files of about equal size, biggest first (as DCP does)."""
    sizes = [0] * n
    out: list[list[WriteItem]] = [[] for _ in range(n)]
    for item in sorted(items, key=_size, reverse=True):
        i = sizes.index(min(sizes))
        out[i].append(item)
        sizes[i] += _size(item)
    return out


def _size(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    return torch.Size(item.tensor_data.size).numel() * item.tensor_data.properties.dtype.itemsize
