"""The writer process's own side, and the two ways of writing a file from memory parts.

Run as a script (``python write_child.py FD PARENT_PID``) by ``write_process.WriterProcess``:
it imports only the standard library and ``xxhash`` (no torch: it starts in ~50 ms), maps
the arenas it is sent (memfd descriptors over the socket), and answers each write request
with every file's size and XXH3-64. The file writers (``write_direct``: ``O_DIRECT``, the
disk reading arena or tensor bytes in place, frames through an aligned bounce buffer;
``write_parts``: ``writev`` through the page cache) are also used by the writer threads of a
synchronous save (``writer.py``). The wire format (``send``/``recv``: a length-prefixed JSON
header and a blob, descriptors on the first bytes) is shared with the parent.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the child: keep the package's own modules off its import path
    sys.path.pop(0)

import errno
import json
import mmap
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import xxhash

_HEAD = struct.Struct("<QQ")  # JSON header length, blob length
_IOV = 512  # segments per writev
_PIECE = 4 << 20  # big segments are checksummed and written in pieces of this size (cache-warm)
NICE = 10  # as background.NICE (not imported: the child imports nothing of the package)

BLOCK = 4096  # O_DIRECT: offsets, lengths and addresses in multiples of this
_BOUNCE = 8 << 20
INLINE, GAP = -1, -2  # segment sources besides an arena id: the request's blob, zeros
ALIGN_MIN = 1 << 20  # items at least this big start their data at an arena-congruent offset

#: one segment of a file: (arena id, offset, length); arena id INLINE: a stretch of the
#: request's blob, GAP: ``length`` zero bytes (padding between items)
Segment = tuple[int, int, int]
_Part = tuple[memoryview, "int | None"]  # bytes to write; for arena bytes, their address mod BLOCK

# --- the wire format, both sides -------------------------------------------------------------


def send(sock: socket.socket, header: dict[str, Any], blob: bytes | memoryview = b"", fds: list[int] = ()) -> None:  # type: ignore[assignment]
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


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytearray, list[int]] | None:
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
    while (msg := recv(sock)) is not None:
        header, blob, fds = msg
        if header["op"] == "map":
            maps[header["id"]] = mmap.mmap(fds[0], header["size"], prot=mmap.PROT_READ)
            os.close(fds[0])
        elif header["op"] == "unmap":
            _unmap(maps.pop(header["id"], None))
        else:
            send(sock, _write_request(header, blob, maps))


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
    if src == INLINE:
        return inline[offset : offset + length], None
    if src == GAP:
        return memoryview(bytes(length)), None
    return views[src][offset : offset + length], offset % BLOCK


def write_direct(path: str, parts: Iterable[_Part]) -> tuple[int, str] | None:
    """``_write_direct_io`` unless ``DISTCKPT_DIRECT_IO=0`` (then None: write through the
    page cache with ``write_parts``)."""
    if not direct_io_enabled():
        return None
    return _write_direct_io(path, parts)


def direct_io_enabled() -> bool:
    return os.environ.get("DISTCKPT_DIRECT_IO", "1") != "0"


def _write_direct_io(path: str, parts: Iterable[_Part]) -> tuple[int, str] | None:
    """Write ``parts`` with ``O_DIRECT``: the disk reads an arena's bytes where they are (no
    copy into the page cache, no writeback later); the frames and any stretch that is not
    block-aligned go through a small aligned bounce buffer. None where the file system does
    not take ``O_DIRECT`` (the caller writes through the page cache then)."""
    try:
        # not truncated: a recycled file (``layout/recycle.py``) is written over in place, then cut to size
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    bounce = mmap.mmap(-1, _BOUNCE + BLOCK)  # page-aligned; a congruent part may add < BLOCK
    bv = memoryview(bounce)
    h, pos, held = xxhash.xxh3_64(), 0, 0  # held: bytes in the bounce buffer, file bytes [pos - held, pos)
    try:
        for view, mod in parts:
            h.update(view)
            at, n = 0, len(view)
            if mod is not None and n >= 2 * BLOCK and (mod - pos) % BLOCK == 0:
                at = (-pos) % BLOCK  # up to the next block boundary through the bounce buffer
                bv[held : held + at] = view[:at]
                pos, held = pos + at, held + at
                if held:
                    _write_all(fd, bv[:held])
                    held = 0
                whole = (n - at) // BLOCK * BLOCK  # then straight from the arena
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
            pad = -held % BLOCK
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
