"""Who reads what in a restore that shares files between ranks (``SharedReader``): a pure
function of what every rank needs, the same on every rank.

* Shared storage (S3, NFS, a local disk every rank sees): a file one rank needs is read by
  that rank; a file several ranks need is read by one rank (the least loaded so far,
  biggest files first, so the files are striped over the ranks) and broadcast in chunks;
  chunks of different files alternate, so the readers read at the same time.
* Node-local storage (node memory): every rank that needs a file its node holds reads it
  itself; a rank whose node lacks it receives it point to point from one holder (the one
  that has sent least), and no other rank takes part.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

CHUNK = 32 << 20  # bytes per broadcast (and per read of a shared file)
PIECE = 8 << 20  # bytes per point-to-point send: gloo moves smaller messages faster (~2.5 vs 2 GB/s)


class Chunk(NamedTuple):
    """Bytes ``[start, end)`` of file ``name``, read by rank ``src`` and sent to the ranks
    ``to`` (None: broadcast to every rank of the group)."""

    name: str
    start: int
    end: int
    src: int
    to: tuple[int, ...] | None = None


def schedule(
    needs: list[dict[str, int]], holders: dict[str, set[int]] | None = None
) -> tuple[list[list[str]], list[Chunk]]:
    """(the same on every rank) Who reads what: per rank, the files it reads for itself, and
    the global order of the chunks sent between ranks.

    Shared storage (``holders`` None): a file one rank needs is read by that rank; a file
    several ranks need is read by one of them (the least loaded so far, biggest files first)
    and broadcast. Node-local (``holders``: the ranks whose node holds each file): every rank
    that needs a file its node holds reads it; the others receive it from one holder."""
    ranks_of: dict[str, list[int]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for rank, files in enumerate(needs):
        for name, size in files.items():
            ranks_of[name].append(rank)
            sizes[name] = size
    load, sending = [0] * len(needs), [0] * len(needs)
    own: list[list[str]] = [[] for _ in needs]
    sent: dict[str, tuple[int, tuple[int, ...] | None]] = {}  # file -> (sender, receivers)
    biggest_first = sorted(sizes, key=lambda n: (-sizes[n], n))  # the stripes even out
    for name in biggest_first:
        needers = ranks_of[name]
        if holders is not None and holders.get(name):
            held = holders[name]
            readers = [r for r in needers if r in held]
            rest = tuple(r for r in needers if r not in held)
            for r in readers:
                own[r].append(name)
                load[r] += sizes[name]
            if rest:  # a reader sends what it reads anyway (the one that sent least); else a holder
                src = min(readers or sorted(held), key=lambda r: (sending[r], load[r], r))
                sending[src] += sizes[name]
                if src not in readers:
                    load[src] += sizes[name]
                else:
                    own[src].remove(name)  # streamed: read once, for itself and for the others
                sent[name] = (src, rest)
        elif len(needers) == 1:
            own[needers[0]].append(name)
            load[needers[0]] += sizes[name]
    for name in biggest_first:
        if name not in sent and not any(name in own[r] for r in ranks_of[name]):
            src = min(range(len(needs)), key=lambda r: (load[r], r))
            load[src] += sizes[name]
            sent[name] = (src, None)
    step = {name: CHUNK if to is None else PIECE for name, (_, to) in sent.items()}
    chunks = [
        (k, name, Chunk(name, start, min(start + step[name], sizes[name]), src, to))
        for name, (src, to) in sent.items()
        for k, start in enumerate(range(0, max(sizes[name], 1), step[name]))
    ]
    chunks.sort(key=lambda c: (c[0], c[1]))  # round-robin over files: the readers read at once
    return own, [c for _, _, c in chunks]
