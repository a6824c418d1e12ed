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

The child's side, the wire format and the file writers are in ``write_child.py`` (the
child's script: it imports nothing of the package).
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from . import write_child
from .write_child import INLINE, Segment, direct_io_enabled, recv, send


class WriterProcessError(RuntimeError):
    """The writer process exited or broke its protocol while a save was being written."""


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
        program = Program.of([segments for _, segments in files], arenas)
        return self.write_program([path for path, _ in files], program, threads)

    def write_program(self, paths: list[str], program: Program, threads: int) -> list[Any]:
        """``write`` with the segments already packed (``Program``: the same for every save
        of one layout), into the files ``paths``."""
        header = program.header(paths, threads)
        with self._lock:
            sock = self._started()
            try:
                self._unmap_forgotten()
                for aid, arena in program.arenas.items():
                    if aid not in self._mapped:
                        send(sock, {"op": "map", "id": aid, "size": arena.size}, fds=[arena.fd])
                        self._mapped.add(aid)
                send(sock, header, program.blob)
                reply = recv(sock)
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
                    send(self._sock, {"op": "unmap", "id": aid})
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
                [sys.executable, write_child.__file__, str(child.fileno()), str(os.getpid())],
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


@dataclass(frozen=True)
class Program:
    """A request's files without their paths: each file's ``(first segment, count)``, the
    segments packed as int64 triples followed by the inline bytes (identical frames sent
    once), and the arenas they name (id -> ``Arena``)."""

    spans: list[tuple[int, int]]
    blob: bytes
    seg_bytes: int
    arenas: dict[int, Any]

    @classmethod
    def of(cls, files: list[list[Segment | bytes]], arenas: dict[int, Any]) -> Program:
        segs, inline, pos, seen = array.array("q"), [], 0, {}
        spans = []
        for segments in files:
            spans.append((len(segs) // 3, len(segments)))
            for seg in segments:
                if isinstance(seg, bytes):
                    at = seen.get(seg)
                    if at is None:
                        at = seen[seg] = pos
                        inline.append(seg)
                        pos += len(seg)
                    segs.extend((INLINE, at, len(seg)))
                else:
                    segs.extend(seg)
        packed = segs.tobytes()
        return cls(spans, packed + b"".join(inline), len(packed), dict(arenas))

    def header(self, paths: list[str], threads: int) -> dict[str, Any]:
        return {
            "op": "write",
            "files": [[path, first, count] for path, (first, count) in zip(paths, self.spans, strict=True)],
            "threads": threads,
            "seg_bytes": self.seg_bytes,
            "direct": direct_io_enabled(),
        }


WRITER = WriterProcess()
