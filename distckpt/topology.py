"""Who does what on each tier: the one place these rules live.

A *shared* tier (the job's URL: an object store or a shared filesystem) is owned by the
chief: it takes the lease, cleans leftovers, commits and applies retention there. A
node-local tier (``local_dir``) is owned, on each node, by that node's first rank (its
*leader*): every node commits its own copy of each step (same manifest, its own ranks'
files) and prunes its own disk. Ranks share a node when they share a host name and the
real path of ``local_dir``.

``open_tiers`` is where each tier's owner first touches it: at construction it checks the
root, takes the lease (one writing job per shared root) and removes leftovers of earlier
runs, which is safe only because no other job writes there.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from .layout.lease import Lease
from .layout.manifest import Manifest
from .layout.tier import Tier, Tiers
from .ranks import Ranks


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    chief: bool  #: rank 0: owns the shared tier, writes the manifest
    leader: bool  #: the first rank of its node: owns the node's local tier
    chief_node: bool  #: shares a node (and a local tier) with the chief
    nodes: int  #: how many distinct local tiers there are
    node: int = 0  #: this rank's node, numbered by its first rank
    leaders: tuple[int, ...] = (0,)  #: each node's first rank, by node number
    node_of: tuple[int, ...] = (0,)  #: every rank's node number

    @classmethod
    def find(cls, ranks: Ranks, local_dir: str | None) -> Topology:
        """(all ranks; a collective when there is a local tier)"""
        if local_dir is None:  # no local tier: nothing to coordinate
            return cls(ranks.rank, ranks.world_size, ranks.is_chief, ranks.is_chief, True, 1)
        key = (socket.gethostname(), os.path.realpath(local_dir))
        keys = ranks.all_gather(key)
        first: dict[tuple[str, str], int] = {}
        for rank, k in enumerate(keys):
            first.setdefault(k, rank)
        leaders = tuple(sorted(first.values()))
        return cls(
            ranks.rank,
            ranks.world_size,
            ranks.is_chief,
            first[key] == ranks.rank,
            key == keys[0],
            len(first),
            leaders.index(first[key]),
            leaders,
            tuple(leaders.index(first[k]) for k in keys),
        )

    def owns(self, tier: Tier) -> bool:
        """Opens, commits, aborts, cleans and prunes ``tier`` (the chief for a shared tier,
        each node's leader for a node-local one)."""
        return self.chief or (self.leader and not tier.shared)

    def prepares(self, tier: Tier, writes: bool) -> bool:
        """Creates the step's work directory on ``tier``: ranks that write files, and the
        owners of node-local tiers (which hold a committed copy even without files)."""
        return writes or self.owns(tier)

    def replicates_commit(self, tier: Tier) -> bool:
        """Every node commits its own copy of a step on ``tier`` (node-local, several nodes)."""
        return not tier.shared and self.nodes > 1

    def commits_node_copy(self, tier: Tier) -> bool:
        """This rank commits its node's copy after the chief committed its own."""
        return self.replicates_commit(tier) and self.leader and not self.chief_node

    def files_to_check(self, tier: Tier, man: Manifest) -> list[str]:
        """The files of a step this rank checks before a restore: on a shared tier the work
        is shared out; on a node-local tier each rank checks the files it wrote."""
        names = sorted(man.files)
        if tier.shared:
            return names[self.rank :: self.world_size]
        return [n for n in names if man.files[n].rank == self.rank]


def open_tiers(ranks: Ranks, topology: Topology, tiers: Tiers, read_only: bool) -> tuple[str, Lease | None]:
    """(all ranks, at construction) Each tier's owner checks its root and, unless
    ``read_only``, prepares it, takes the lease of a shared root and cleans leftovers.
    Returns the chief's nonce (agreed: it names this job's work directories) and the lease
    this rank holds (the chief's; ``None`` elsewhere)."""
    held: list[Lease] = []

    def open_mine() -> str | None:
        for tier in tiers.all:
            if not topology.owns(tier):
                continue
            tier.catalog.check_root()  # fails early, clearly, on a file or a single step
            if read_only:
                continue
            tier.commit.open_root()
            if tier.shared:
                held.append(Lease(tier.storage, tier.catalog.root))
                held[-1].acquire()  # refuses a second writing job clearly
            tier.catalog.clean_leftovers()
        return uuid.uuid4().hex[:12] if ranks.is_chief else None

    nonce = ranks.agree(open_mine, f"opening {tiers.primary.storage.url}")[0]
    return nonce, held[0] if held else None
