"""The items of one stored file that a rank needs, and where their bytes go (``SharedReader``).

A file this rank reads alone is read in place (``ItemFile.spans``: each item's frame head
into a small buffer of its own, its data into its destination tensor, the bytes between
into scratch), with scatter reads. A file that streams by in chunks from another rank is
fed in order (``feed``): each item's frame head is collected and compared, its data lands
in its destination tensor (or a buffer), and a chunk that lies inside one item's data can be
read or received straight into place (``ItemFile.inside`` / ``landing``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch


@dataclasses.dataclass
class Item:
    """One stored item this rank needs: where its frame head and data lie in the file, and
    where its bytes go."""

    head_at: int
    head: bytes
    start: int  # first data byte in the file
    nbytes: int
    reqs: list[Any]
    dst: Any = None  # a uint8 view of the destination when the bytes can land there directly
    tmp: torch.Tensor | None = None  # else a buffer the item is assembled in, then copied
    seen_head: bytearray = dataclasses.field(default_factory=bytearray)
    got: int = 0

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    def sink(self) -> Any:
        if self.dst is None and self.tmp is None:
            self.tmp = torch.empty(self.nbytes, dtype=torch.uint8)
        return self.dst if self.dst is not None else self.tmp.numpy()


class ItemFile:
    """The items of one file this rank needs, fed with the file's bytes in order."""

    def __init__(self, items: list[Item]) -> None:
        self.items = sorted(items, key=lambda i: i.head_at)
        self._next = 0  # items before this one are complete

    def spans(self, size: int) -> Iterator[tuple[int, int, memoryview | None]]:
        """The whole file in order, as ``(offset, length, destination)``: each item's frame head
        (into ``seen_head``) and data (into its tensor or buffer); None for the bytes between
        (frame tails, alignment, items this rank does not need)."""
        pos = 0
        for item in self.items:
            if item.head_at > pos:
                yield pos, item.head_at - pos, None
            item.seen_head = bytearray(len(item.head))
            yield item.head_at, len(item.head), memoryview(item.seen_head)
            if item.nbytes:
                yield item.start, item.nbytes, memoryview(item.sink()).cast("B")
            pos = item.end
        if size > pos:
            yield pos, size - pos, None

    def read(self) -> None:
        """Every item's bytes arrived (``spans``, read whole)."""
        for item in self.items:
            item.got = item.nbytes
        self._next = len(self.items)

    def feed(self, offset: int, data: memoryview) -> None:
        """Bytes ``[offset, offset + len(data))`` of the file."""
        end = offset + len(data)
        i = self._next
        while i < len(self.items) and self.items[i].head_at < end:
            item = self.items[i]
            a, b = max(offset, item.head_at), min(end, item.start)
            if a < b and len(item.seen_head) == a - item.head_at:
                item.seen_head += data[a - offset : b - offset]
            a, b = max(offset, item.start), min(end, item.end)
            if a < b:
                memoryview(item.sink()).cast("B")[a - item.start : b - item.start] = data[a - offset : b - offset]
                item.got += b - a
            if item.end <= end and i == self._next:
                self._next += 1
            i += 1

    def inside(self, start: int, end: int) -> tuple[Item, torch.Tensor] | None:
        """The one item whose data holds bytes ``[start, end)`` of the file, with its
        destination's view of them; None if there is none or it has no destination."""
        i = self._next
        while i < len(self.items) and self.items[i].head_at < end:
            item = self.items[i]
            if item.start <= start and end <= item.end:
                if item.dst is None:
                    return None
                return item, torch.from_numpy(item.dst[start - item.start : end - item.start])
            i += 1
        return None

    def landing(self, start: int, end: int) -> tuple[Item, torch.Tensor] | None:
        """Where bytes ``[start, end)`` may be received straight into place: ``inside``, its
        item's frame head seen and as expected (the head comes first in the file, so it has
        been fed by then)."""
        found = self.inside(start, end)
        return found if found is not None and bytes(found[0].seen_head) == found[0].head else None
