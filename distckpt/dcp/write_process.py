"""A writer process: background saves write from shared memory, outside the training process.

A background save written by threads of the training process slows the training loop
beside it, although its big writes release the GIL: every item still runs Python (framing,
checksumming, bookkeeping) that takes the GIL from a loop which needs it between every
operator, and with the writer threads at a lower CPU priority the GIL can wait on a thread
the scheduler has put aside. Measured on 2 cores: a training loop lost 0.3-0.4 s per 0.5 GB
save beside distckpt's writer threads, about nothing beside one thread calling ``os.write``
on the same bytes.

So a save staged into a host arena (``arena.py``: the arenas are ``memfd`` memory, shared
with this process) is written by one child process, started on the first such save. The
parent sends, per save, a program: for each file, its path and a list of segments - a
stretch of a shared arena (the tensors' bytes, as staged) or of the message itself (the
frames around them, or a gap of zeros) - and gets back each file's size and XXH3-64
checksum, computed on the same pass. The child writes each file with ``O_DIRECT``: the
writer places every item of 1 MB or more so that its data starts at a file offset congruent
to its arena offset modulo 4 KB (``writer.gap_before``), so the block-aligned middle of it
goes from the arena to the disk with no copy into the page cache and no writeback after it
(a buffered write moves the state through memory three times - copy, checksum, writeback -
and a memory-bound training loop beside it feels each pass); frames and fringes go through
a small aligned bounce buffer. Where the file system refuses ``O_DIRECT`` (EINVAL), or with
``DISTCKPT_DIRECT_IO=0``, it writes through the page cache with ``writev``. Then it fsyncs.
The child runs at a lower CPU priority, has no GIL in common with training and never
imports torch (it starts in ~50 ms).

Call order: 1. (save thread) ``WRITER.write(files, threads)`` maps any arena the child has
not seen (its file descriptor passed over the socket), sends the program, waits for the
answer. 2. (any thread) ``WRITER.forget(arena_id)`` when an arena is dropped, so the child
unmaps it. Guarantees: an OS error in the child (ENOSPC, EIO) is raised in the parent as the
same ``OSError``; a child that dies is a ``WriterProcessError`` naming its exit, never a
hang, and the next save starts a new child; a child whose parent died exits within 50 ms
(it never writes into a directory a restarted job is cleaning up).

This file is also the child's script (``python write_process.py FD PARENT_PID``): it
imports only the standard library and ``xxhash``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the child: keep the package's own modules off its import path
    sys.path.pop(0)

import array
import errno
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from typing import Any

import xxhash

_HEAD = struct.Struct("<QQ")  # JSON header length, blob length
_IOV = 512  # segments per writev
_PIECE = 4 << 20  # big segments are checksummed and written in pieces of this size (cache-warm)
NICE = 10  # as background.NICE (not imported: the child imports nothing of the package)

_BLOCK = 4096  # O_DIRECT: offsets, lengths and addresses in multiples of this
_BOUNCE = 8 << 20
_INLINE, _GAP = -1, -2  # segment sources besides an arena id: the request's blob, zeros
ALIGN_MIN = 1 << 20  # items at least this big start their data at an arena-congruent offset

#: one segment of a file: (arena id, offset, length); arena id _INLINE: a stretch of the
#: request's blob, _GAP: ``length`` zero bytes (padding between items)
Segment = tuple[int, int, int]
_Part = tuple[memoryview, "int | None"]  # bytes to write; for arena bytes, their address mod _BLOCK


class WriterProcessError(RuntimeError):
    """The writer process exited or broke its protocol while a save was being written."""


# --- the wire format, both sides -------------------------------------------------------------


def _send(sock: socket.socket, header: dict[str, Any], blob: bytes | memoryview = b"", fds: list[int] = ()) -> None:  # type: ignore[assignment]
    head = json.dumps(header).encode()
    prefix = _HEAD.pack(len(head), len(blob)) + head
    if fds:  # the descriptors ride on the first bytes of the message
        sent = socket.send_fds(sock, [prefix], list(fds))
        sock.sendall(prefix[sent:])
    else:
        sock.sendall(prefix)
    if blob:
        sock.sendall(blob)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytearray, list[int]] | None:
    """One message, or None at end of stream."""
    first, fds, _, _ = socket.recv_fds(sock, _HEAD.size, 4)
    if not first:
        return None
    rest = _recv_exactly(sock, _HEAD.size - len(first)) if len(first) < _HEAD.size else bytearray()
    if rest is None:
        return None
    head_len, blob_len = _HEAD.unpack(bytes(first) + bytes(rest))
    head = _recv_exactly(sock, head_len)
    blob = _recv_exactly(sock, blob_len) if blob_len else bytearray()
    if head is None or blob is None:
        return None
    return json.loads(head), blob, list(fds)


# --- the parent side -------------------------------------------------------------------------


class WriterProcess:
    """The parent's handle on its one writer child (started on first use, restarted after it
    died). Requests are serialised: one save's files at a time, written by ``threads``
    threads of the child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._mapped: set[int] = set()
        self._forgotten: list[int] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def write(self, files: list[tuple[str, list[Segment | bytes]]], threads: int, arenas: dict[int, Any]) -> list[Any]:
        """Write each ``(path, segments)`` durably; ``bytes`` segments are sent inline,
        others name a stretch of one of ``arenas`` (id -> ``Arena``). Returns each file's
        ``(size, xxh3 hex digest)``."""
        header, blob = _program(files, threads)
        with self._lock:
            sock = self._started()
            try:
                self._unmap_forgotten()
                for aid, arena in arenas.items():
                    if aid not in self._mapped:
                        _send(sock, {"op": "map", "id": aid, "size": arena.size}, fds=[arena.fd])
                        self._mapped.add(aid)
                _send(sock, header, blob)
                reply = _recv(sock)
            except OSError as e:
                raise self._died(e) from e
            if reply is None:
                raise self._died(None)
        answer = reply[0]
        if "error" in answer:
            err = answer["error"]
            if err.get("errno") is not None:
                raise OSError(err["errno"], err["strerror"], err.get("path"))
            raise WriterProcessError(f"the writer process failed: {err['strerror']}")
        return [tuple(f) for f in answer["files"]]

    def forget(self, arena_id: int) -> None:
        """(any thread, also the garbage collector's) The arena is gone: the child unmaps it,
        now if no request is in flight, else before the next one (never blocks: a collection
        may run on the very thread that holds the lock)."""
        self._forgotten.append(arena_id)
        if self._lock.acquire(blocking=False):
            try:
                self._unmap_forgotten()
            finally:
                self._lock.release()

    def _unmap_forgotten(self) -> None:
        while self._forgotten:
            aid = self._forgotten.pop()
            if aid in self._mapped and self._sock is not None:
                self._mapped.discard(aid)
                try:
                    _send(self._sock, {"op": "unmap", "id": aid})
                except OSError:  # a dead child holds nothing
                    pass

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _started(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._stop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - our own script, with this interpreter
                [sys.executable, os.path.abspath(__file__), str(child.fileno()), str(os.getpid())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self._sock, self._mapped = parent, set()
        return parent

    def _died(self, cause: OSError | None) -> WriterProcessError:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._stop()
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        detail = f" ({cause})" if cause is not None else ""
        return WriterProcessError(
            f"distckpt's writer process (pid {proc.pid if proc else '?'}) {how} while writing a save{detail}; "
            "this save failed and nothing of it was committed; the next save starts a new writer process"
        )

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the child sees the end of its stream and exits
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._sock, self._proc, self._mapped = None, None, set()


def _program(files: list[tuple[str, list[Segment | bytes]]], threads: int) -> tuple[dict[str, Any], bytes]:
    """The request: ``files`` as [path, first segment, count], segments packed as int64
    triples, inline bytes after them (identical frames sent once)."""
    segs, inline, pos, seen = array.array("q"), [], 0, {}
    header_files = []
    for path, segments in files:
        header_files.append([path, len(segs) // 3, len(segments)])
        for seg in segments:
            if isinstance(seg, bytes):
                at = seen.get(seg)
                if at is None:
                    at = seen[seg] = pos
                    inline.append(seg)
                    pos += len(seg)
                segs.extend((_INLINE, at, len(seg)))
            else:
                segs.extend(seg)
    packed = segs.tobytes()
    direct = os.environ.get("DISTCKPT_DIRECT_IO", "1") != "0"
    header = {"op": "write", "files": header_files, "threads": threads, "seg_bytes": len(packed), "direct": direct}
    return header, packed + b"".join(inline)


WRITER = WriterProcess()


# --- the child side --------------------------------------------------------------------------


def _child(fd: int, parent: int) -> None:
    # A preemption signal goes to every process of the job (SLURM) or of the terminal's group
    # (Ctrl-C): the parent turns it into a final save, which this process must be alive to
    # write. It ends with its parent (_watch_parent) or when the parent closes the socket.
    for sig in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, sig), signal.SIG_IGN)
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < NICE:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except OSError:
        pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    sock = socket.socket(fileno=fd)
    maps: dict[int, mmap.mmap] = {}
    while (msg := _recv(sock)) is not None:
        header, blob, fds = msg
        if header["op"] == "map":
            maps[header["id"]] = mmap.mmap(fds[0], header["size"], prot=mmap.PROT_READ)
            os.close(fds[0])
        elif header["op"] == "unmap":
            _unmap(maps.pop(header["id"], None))
        else:
            _send(sock, _write_request(header, blob, maps))


def _watch_parent(parent: int) -> None:
    """Exit as soon as the parent is gone (kill -9): never write into a directory that a
    restarted job may be cleaning up."""
    while os.getppid() == parent:
        time.sleep(0.05)
    os._exit(1)


def _unmap(m: mmap.mmap | None) -> None:
    if m is not None:
        try:
            m.close()
        except BufferError:  # a view of it is still alive; dropped with it
            pass


def _write_request(header: dict[str, Any], blob: bytearray, maps: dict[int, mmap.mmap]) -> dict[str, Any]:
    seg_bytes = header["seg_bytes"]
    segs = memoryview(blob)[:seg_bytes].cast("q")
    inline = memoryview(blob)[seg_bytes:]
    views = {aid: memoryview(m) for aid, m in maps.items()}
    files = header["files"]
    results: list[Any] = [None] * len(files)
    errors: list[dict[str, Any]] = []
    todo = iter(range(len(files)))
    lock = threading.Lock()

    def worker() -> None:
        while not errors:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            path, first, count = files[i]
            try:
                parts = [
                    _part(segs[j], segs[j + 1], segs[j + 2], inline, views)
                    for j in range(3 * first, 3 * (first + count), 3)
                ]
                results[i] = (header.get("direct") and _write_direct_io(path, parts)) or write_parts(path, parts)
            except OSError as e:
                errors.append({"errno": e.errno, "strerror": e.strerror or str(e), "path": path})
            except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
                errors.append({"errno": None, "strerror": f"{type(e).__name__}: {e}", "path": path})

    pool = [threading.Thread(target=worker) for _ in range(max(1, header["threads"]) - 1)]
    for t in pool:
        t.start()
    worker()
    for t in pool:
        t.join()
    return {"error": errors[0]} if errors else {"files": results}


def _part(src: int, offset: int, length: int, inline: memoryview, views: dict[int, memoryview]) -> _Part:
    if src == _INLINE:
        return inline[offset : offset + length], None
    if src == _GAP:
        return memoryview(bytes(length)), None
    return views[src][offset : offset + length], offset % _BLOCK


def write_direct(path: str, parts: Iterable[_Part]) -> tuple[int, str] | None:
    """``_write_direct_io`` unless ``DISTCKPT_DIRECT_IO=0`` (then None: write through the
    page cache with ``write_parts``)."""
    if not _direct_io():
        return None
    return _write_direct_io(path, parts)


def _direct_io() -> bool:
    return os.environ.get("DISTCKPT_DIRECT_IO", "1") != "0"


def _write_direct_io(path: str, parts: Iterable[_Part]) -> tuple[int, str] | None:
    """Write ``parts`` with ``O_DIRECT``: the disk reads an arena's bytes where they are (no
    copy into the page cache, no writeback later); the frames and any stretch that is not
    block-aligned go through a small aligned bounce buffer. None where the file system does
    not take ``O_DIRECT`` (the caller writes through the page cache then)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    bounce = mmap.mmap(-1, _BOUNCE + _BLOCK)  # page-aligned; a congruent part may add < _BLOCK
    bv = memoryview(bounce)
    h, pos, held = xxhash.xxh3_64(), 0, 0  # held: bytes in the bounce buffer, file bytes [pos - held, pos)
    try:
        for view, mod in parts:
            h.update(view)
            at, n = 0, len(view)
            if mod is not None and n >= 2 * _BLOCK and (mod - pos) % _BLOCK == 0:
                at = (-pos) % _BLOCK  # up to the next block boundary through the bounce buffer
                bv[held : held + at] = view[:at]
                pos, held = pos + at, held + at
                if held:
                    _write_all(fd, bv[:held])
                    held = 0
                whole = (n - at) // _BLOCK * _BLOCK  # then straight from the arena
                _write_all(fd, view[at : at + whole])
                pos, at = pos + whole, at + whole
            while at < n:
                k = min(n - at, _BOUNCE - held)
                bv[held : held + k] = view[at : at + k]
                pos, held, at = pos + k, held + k, at + k
                if held >= _BOUNCE:
                    _write_all(fd, bv[:held])
                    held = 0
        if held:
            pad = -held % _BLOCK
            bv[held : held + pad] = bytes(pad)
            _write_all(fd, bv[: held + pad])
        os.ftruncate(fd, pos)  # the last block was padded
        os.fsync(fd)
    except OSError as e:
        if e.errno == errno.EINVAL:  # an alignment this file system does not take
            return None
        raise
    finally:
        os.close(fd)
        bv.release()
        bounce.close()
    return pos, h.hexdigest()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def write_parts(path: str, parts: Iterable[_Part]) -> tuple[int, str]:
    """Write ``parts`` back to back into ``path``, checksummed on the way; fsync; size, digest."""
    h = xxhash.xxh3_64()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        iov: list[memoryview] = []
        for part, _ in parts:
            for at in range(0, len(part), _PIECE) if len(part) > _PIECE else (0,):
                piece = part[at : at + _PIECE]
                h.update(piece)
                iov.append(piece)
                size += len(piece)
                if len(iov) >= _IOV or len(piece) == _PIECE:
                    _writev(fd, iov)
                    iov = []
        _writev(fd, iov)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, h.hexdigest()


def _writev(fd: int, iov: list[memoryview]) -> None:
    """All of ``iov``, however many calls the kernel takes (a write may be partial)."""
    i = 0
    while i < len(iov):
        n = os.writev(fd, iov[i : i + _IOV])
        while i < len(iov) and n >= len(iov[i]):
            n -= len(iov[i])
            i += 1
        if n:
            iov[i] = iov[i][n:]


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
