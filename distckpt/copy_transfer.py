"""One node's copy of one step, moved between two node leaders over a gloo group (point to
point). ``send_copy`` and ``receive_copy`` are called in the same order at both ends.

On the wire: a header (the manifest, the file names and sizes), every file in 8 MB pieces,
then a trailer naming the files the sender could not read. Both ends go through a few
reused buffers, reading (receiving) on a thread while the other side of the pipe sends
(checksums and writes), so neither waits for the other. Whatever fails at either end, every
promised byte still crosses: no end is left waiting. The receiver checks every file against
the manifest and commits the copy (atomic rename) only when all of it arrived intact.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .layout.manifest import MANIFEST, Checksum, Manifest
from .layout.tier import Tier
from .log import log
from .storage import read_exactly


def send_copy(tier: Tier, step: int, dst: int, group: Any) -> None:
    """(a node leader) ``tier``'s copy of ``step`` to rank ``dst`` of ``group``. A file that
    fails to read mid-way is sent as zeros from there on: the receiver gets every byte it
    was promised and does not commit (the trailer says why)."""
    try:
        catalog, storage = tier.catalog, tier.storage
        man = catalog.read_manifest(step)
        stepdir = catalog.step_path(step)
        names = sorted(n for n in storage.listdir(stepdir) if n != MANIFEST)
        sizes = [storage.size(storage.join(stepdir, n)) for n in names]
    except Exception as e:
        _send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), dst, group)
        raise
    _send_bytes(json.dumps({"manifest": man.to_json().decode(), "names": names, "sizes": sizes}).encode(), dst, group)
    errors: list[str] = []
    files: dict[str, Any] = {}

    def read(piece: _Piece, buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy())[: piece.end - piece.start]
        try:
            if piece.name in errors:
                raise OSError("read failed earlier")
            if piece.start == 0:
                files[piece.name] = storage.open_read(storage.join(stepdir, piece.name))
            read_exactly(files[piece.name], view)
        except Exception as e:
            if piece.name not in errors:
                errors.append(piece.name)
                log.warning("step %d: reading %s to send it failed (%s)", step, piece.name, e)
            buf[: len(view)].zero_()
        if piece.last and piece.name in files:
            files.pop(piece.name).close()

    try:
        _pipeline(_pieces(names, sizes), read, lambda piece, buf: _send_piece(buf, piece, dst, group))
    finally:
        for f in files.values():
            f.close()
    _send_bytes(json.dumps({"failed": errors}).encode(), dst, group)
    if errors:
        raise OSError(f"step {step}: {errors} could not be read to send them to rank {dst}")


def receive_copy(tier: Tier, step: int, src: int, group: Any) -> None:
    """(a node leader) The copy of ``step`` that rank ``src`` of ``group`` sends, committed
    on ``tier``; ``OSError`` (nothing committed) when any of it is missing or damaged."""
    head = json.loads(_recv_bytes(src, group))
    if "error" in head:
        raise OSError(f"step {step}: rank {src} could not send its copy ({head['error']})")
    man = Manifest.from_json(head["manifest"].encode(), f"the manifest of step {step} from node leader {src}")
    workdir = tier.commit.workdir(step, f"replica-{src}")
    storage = tier.storage
    problems: dict[str, str] = {}
    open_files: dict[str, tuple[Any, Checksum]] = {}

    def write(piece: _Piece, buf: torch.Tensor) -> None:
        data = memoryview(buf.numpy())[: piece.end - piece.start]
        try:
            if piece.name in problems or "" in problems:
                return
            if piece.start == 0:
                open_files[piece.name] = (storage.open_write(storage.join(workdir, piece.name)), Checksum())
            f, hasher = open_files[piece.name]
            hasher.update(data)
            f.write(data)
            if piece.last:
                f.close()
                del open_files[piece.name]
                rec = man.files.get(piece.name)
                if rec is not None and (hasher.size != rec.size or hasher.hexdigest() != rec.checksum):
                    problems[piece.name] = "arrived damaged"
        except Exception as e:  # every piece is still received: the sender is never left waiting
            problems.setdefault(piece.name, f"{type(e).__name__}: {e}")

    try:
        tier.commit.create_workdir(workdir)
    except Exception as e:  # still received in full (the sender is not left waiting), then raised
        problems[""] = f"{type(e).__name__}: {e}"
    try:
        _pipeline(_pieces(head["names"], head["sizes"]), lambda piece, buf: _recv_piece(buf, piece, src, group), write)
    finally:
        for f, _ in open_files.values():
            f.close()
    failed = json.loads(_recv_bytes(src, group))["failed"]
    if failed or problems:  # nothing is committed
        tier.commit.abort(workdir)
        why = {**problems, **{n: "the sender could not read it" for n in failed}}
        raise OSError(f"step {step}: the copy from rank {src} is not kept: {why}")
    if tier.catalog.is_committed(step):
        tier.commit.abort(workdir)
        return
    tier.commit.finish(workdir, man)


class _Piece(NamedTuple):
    name: str
    start: int
    end: int
    last: bool


_PIECE = 8 << 20  # bytes per message between leaders (buffers are reused: no fresh pages per file)
_BUFFERS = 3


def _pieces(names: list[str], sizes: list[int]) -> list[_Piece]:
    out = []
    for name, size in zip(names, sizes, strict=True):
        starts = list(range(0, size, _PIECE)) or [0]
        out += [_Piece(name, s, min(s + _PIECE, size), s == starts[-1]) for s in starts]
    return out


def _pipeline(
    pieces: list[_Piece], first: Callable[[_Piece, torch.Tensor], None], then: Callable[[_Piece, torch.Tensor], None]
) -> None:
    """``first(piece, buf)`` for every piece on a thread, ``then(piece, buf)`` here, in order,
    over a few reused buffers: reading and sending (or receiving and writing) overlap.
    Neither callable may raise: they record their problems."""
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(min(_BUFFERS, len(pieces))):
        free.put(torch.empty(_PIECE, dtype=torch.uint8))
    failed: list[BaseException] = []

    def run_first() -> None:
        try:
            for piece in pieces:
                buf = free.get()
                if buf is None:
                    return
                first(piece, buf)
                ready.put(buf)
        except BaseException as e:  # noqa: BLE001 - a broken connection: raised on the calling thread
            failed.append(e)
            ready.put(None)

    worker = threading.Thread(target=run_first, name="distckpt-replica-io")
    worker.start()
    try:
        for piece in pieces:
            buf = ready.get()
            if buf is None:
                raise failed[0]
            then(piece, buf)
            free.put(buf)
    finally:
        free.put(None)
        worker.join()


def _send_piece(buf: torch.Tensor, piece: _Piece, dst: int, group: Any) -> None:
    if piece.end > piece.start:
        dist.send(buf[: piece.end - piece.start], group=group, group_dst=dst)


def _recv_piece(buf: torch.Tensor, piece: _Piece, src: int, group: Any) -> None:
    if piece.end > piece.start:
        dist.recv(buf[: piece.end - piece.start], group=group, group_src=src)


def _send_tensor(t: torch.Tensor, dst: int, group: Any) -> None:
    dist.send(torch.tensor([t.numel()], dtype=torch.int64), group=group, group_dst=dst)
    if t.numel():
        dist.send(t, group=group, group_dst=dst)


def _recv_tensor(src: int, group: Any) -> torch.Tensor:
    n = torch.zeros(1, dtype=torch.int64)
    dist.recv(n, group=group, group_src=src)
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    if buf.numel():
        dist.recv(buf, group=group, group_src=src)
    return buf


def _send_bytes(data: bytes, dst: int, group: Any) -> None:
    _send_tensor(
        torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8), dst, group
    )


def _recv_bytes(src: int, group: Any) -> bytes:
    return _recv_tensor(src, group).numpy().tobytes()
