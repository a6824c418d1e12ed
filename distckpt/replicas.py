"""Peer replicas of the node-local tier: a lost node's memory comes back from its partner.

With ``local_dir`` (e.g. on ``/dev/shm``) every node commits its own copy of each step
(its ranks' files, the manifest, ``state.json``). With ``replicas=r`` (default 1) each node
also keeps copies of the ``r`` nodes before it in a ring: node ``i``'s copy lives on nodes
``i+1 .. i+r`` (mod the node count) under ``<local_dir>/replicas/node-<i>``, itself a tier
with the same commit (files, then the manifest and an atomic rename): a replica is either
whole or absent. Everything goes over the job's own process group (gloo, point to point
between node leaders, in 8 MB pieces through a few reused buffers, reading and sending
overlapped); nothing touches the remote tier.

Call order:
  1. (all ranks, save thread, after every node committed its copy) ``replicate(step)``:
     each node leader sends its node's copy to its partners and receives theirs; checksums
     are checked against the manifest before the replica is committed. The save is
     *protected* when this returns on every rank (it is part of the save: ``wait()`` on
     its handle returns then). A partner that fails makes the save fail on every rank; the
     step is still committed on every node and uploaded, only not protected.
  2. (all ranks, restore, before the step is chosen) ``repair()``: the leaders say what they
     hold; for every step that every node can assemble (its own copy, else a partner's
     replica) a node missing its copy receives it from a partner, and a partner missing its
     replica receives it too (the step is protected again) - in the background, while
     training resumes (``refill()`` starts it after the restore read what it needed;
     ``settle()`` waits). Only the chief node's own copy comes back before the restore.
     Receives a kill interrupted are removed here and after every ``replicate``. The restore reads node memory meanwhile: each
     rank reads what its node holds (own copy or replica) and receives only the rest from
     other nodes. A step that cannot be assembled is dropped from node memory and left to
     the remote tier, with a log line that says which node lost both copies.
  3. (node leaders, after ``replicate``) ``prune(keep)``: replicas of the newest ``keep``
     steps of each partner are kept, as on the local tier itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .copy_transfer import receive_copy, send_copy
from .layout.tier import Tier
from .log import log
from .ranks import Ranks
from .retention import Keep, apply
from .topology import Topology


@dataclass
class Transfer:
    """One node's copy of one step, sent from ``src`` node (its own or a replica) to ``dst``."""

    step: int
    owner: int  #: the node whose ranks wrote these files
    src: int
    dst: int


class Replicator:
    """Replicas of ``local`` (this node's tier) on partner nodes; see the module doc."""

    def __init__(self, ranks: Ranks, topology: Topology, local: Tier, replicas: int, keep: int = 2) -> None:
        self.ranks, self.topology, self.local, self.keep = ranks, topology, local, keep
        self.replicas = min(replicas, topology.nodes - 1)
        self.stores: dict[int, Tier] = {}  # owner node -> the tier holding its replicas here
        self._later: tuple[list[Transfer], Any] = ([], None)  # what repair() left for refill()
        self._refill: threading.Thread | None = None  # after a restore: the copies moved in the background

    @property
    def active(self) -> bool:
        return self.replicas > 0

    def partners(self, node: int) -> list[int]:
        """The nodes holding ``node``'s replicas."""
        return [(node + k) % self.topology.nodes for k in range(1, self.replicas + 1)]

    def store(self, owner: int) -> Tier:
        """(this node) the tier that holds ``owner``'s replicas."""
        if owner not in self.stores:
            url = self.local.storage.join(self.local.storage.root, "replicas", f"node-{owner}")
            self.stores[owner] = Tier.open(f"replica-of-{owner}", url, None, shared=False)  # made by a receive
        return self.stores[owner]

    def held_stores(self) -> list[Tier]:
        """(this node) the replica tiers it keeps for its partners."""
        return [self.store(o) for o in range(self.topology.nodes) if self._holds_for(o)]

    def placement(self) -> dict[str, Any] | None:
        """What the manifest records: every rank's node and the nodes holding each node's
        replicas (under ``<local_dir>/replicas/node-<i>``)."""
        if self.topology.nodes < 2:
            return None
        nodes = range(self.topology.nodes)
        return {
            "node_of_rank": list(self.topology.node_of),
            "replicas_of_node": {str(n): self.partners(n) for n in nodes},
        }

    def memory(self) -> tuple[int, int]:
        """(node leaders) Bytes this node's memory holds: its own copies, its partners' replicas."""
        own = sum(
            _tree_bytes(self.local.storage, self.local.catalog.step_path(s))
            for s in self.local.catalog.committed_steps()
        )
        held = 0
        for owner in range(self.topology.nodes):
            if self._holds_for(owner):
                cat = self.store(owner).catalog
                held += sum(_tree_bytes(self.store(owner).storage, cat.step_path(s)) for s in cat.committed_steps())
        return own, held

    # --- 1. on every save -----------------------------------------------------------------

    def replicate(self, step: int, group: Any) -> None:
        """(all ranks, save thread; only leaders move bytes) ``step`` onto the partners."""
        me = self.topology.node
        plan = [Transfer(step, n, n, p) for n in range(self.topology.nodes) for p in self.partners(n)]
        self._run(plan, group)
        if self.topology.leader:
            self.prune(self.keep)
            own, held = self.memory()
            log.info(
                "node %d memory: %.3f GB of its own steps + %.3f GB of replicas for node(s) %s",
                me,
                own / 1e9,
                held / 1e9,
                [o for o in range(self.topology.nodes) if self._holds_for(o)],
            )

    def prune(self, keep: int) -> None:
        """(node leaders, nothing being received) the newest ``keep`` replicas of each
        partner; replicas whose receiving was interrupted (a kill) are removed."""
        for node in range(self.topology.nodes):
            if self._holds_for(node):
                apply(Keep(last=keep), self.store(node).catalog)
        self._clean()

    def _clean(self) -> None:
        """(node leaders, nothing being received) Remove uncommitted replicas: a receive
        interrupted by a kill leaves its work directory behind, in memory."""
        base = self.local.storage.join(self.local.storage.root, "replicas")
        if not self.local.storage.exists(base):
            return
        for name in self.local.storage.listdir(base):
            if name.startswith("node-") and name[5:].isdigit():
                self.store(int(name[5:])).catalog.clean_leftovers()

    # --- 2. before a restore ------------------------------------------------------------

    def repair(self, group: Any, *, now: bool = False) -> dict[int, list[int]]:
        """(all ranks, restore, before the step is chosen) Plan how every node's copy, and
        every partner's replica, of every step that can be assembled comes back, and drop
        the steps that cannot. Only what the restore needs is moved before it: the chief
        node's own copies (the chief chooses the step from them); a wiped node's ranks read
        what they need from the nodes that hold it. The rest is moved on a background thread
        (newest step first; ``refill()`` starts it once the restore has read what it needs)
        while training resumes; ``settle()`` waits for it, and the next save does. ``now``:
        move everything before returning (a restore that asks for a step other than the
        newest). Returns ``{step: [nodes whose own copy was lost]}``."""
        self.settle()

        def held_here() -> dict[str, Any] | None:
            if not self.topology.leader:
                return None
            self._clean()  # nothing is being received now
            return self.holdings()

        held = self.ranks.agree(held_here, "listing node memory")
        views = {h["node"]: h for h in held if h is not None}
        plan, lost = plan_repairs(views, self.topology.nodes, self.partners)
        for step, nodes in sorted(lost.items()):
            log.warning(
                "step %d cannot be assembled from node memory: node(s) %s have neither their copy nor a "
                "replica of it (a node was lost with its partner, or the save was interrupted before every "
                "node committed it); node memory drops it, and it comes from the remote tier if it was "
                "uploaded there",
                step,
                nodes,
            )
        if lost:  # never restorable from memory; left there, a new save of that step would collide
            self.ranks.agree(lambda: self._drop(lost) if self.topology.leader else None, "dropping partial steps")
        chief = self.topology.node_of[0]
        first = [t for t in plan if now or (t.dst == chief and t.owner == chief)]
        later = sorted((t for t in plan if t not in first), key=lambda t: -t.step)  # the same order everywhere
        if first:
            self.ranks.agree(lambda: self._run(first, group), "fetching node copies from partners")
        self._later = (later, group)
        repaired: dict[int, list[int]] = {}
        for t in plan:
            if t.dst == t.owner:
                repaired.setdefault(t.step, []).append(t.dst)
        return repaired

    def refill(self) -> None:
        """(all ranks, after the restore read what it needed) Start moving the rest of what
        ``repair()`` planned, on a background thread of the node leaders."""
        later, group = self._later
        self._later = ([], None)
        if later and self.topology.leader:
            self._refill = threading.Thread(
                target=self._refill_in_background, args=(later, group), name="distckpt-refill", daemon=True
            )
            self._refill.start()

    def _refill_in_background(self, plan: list[Transfer], group: Any) -> None:
        """(node leaders, a thread) The copies and replicas the restore did not need first."""
        t0 = time.perf_counter()
        try:
            self._run(plan, group)
        except Exception as e:  # noqa: BLE001 - the steps stay restorable; the next save protects anew
            log.warning("node %d: refilling node memory from partners failed (%s); the next save is "
                        "replicated as usual", self.topology.node, e)  # fmt: skip
            return
        mine = [t for t in plan if self.topology.node in (t.src, t.dst)]
        if mine:
            log.info("node %d: node memory refilled from partners (%d copies of steps %s) in %.3fs",
                     self.topology.node, len(mine), sorted({t.step for t in mine}), time.perf_counter() - t0)  # fmt: skip

    def settle(self) -> None:
        """Wait for the background refill that follows a restore (it never raises)."""
        if self._refill is not None:
            self._refill.join()
            self._refill = None

    def _drop(self, lost: dict[int, list[int]]) -> None:
        """(node leaders) Remove this node's copies and replicas of steps no node can assemble."""
        for tier in [self.local, *self.held_stores()]:
            gone = [s for s in lost if tier.catalog.is_committed(s)]
            if gone:
                tier.catalog.delete(gone)

    def _holds_for(self, owner: int) -> bool:
        return owner != self.topology.node and self.topology.node in self.partners(owner)

    def holdings(self) -> dict[str, Any]:
        """(node leaders) the steps this node holds: its own copies and its partners' replicas."""
        node = self.topology.node
        replicas = {}
        for owner in range(self.topology.nodes):
            if self._holds_for(owner):
                replicas[str(owner)] = self.store(owner).catalog.committed_steps()
        return {"node": node, "own": self.local.catalog.committed_steps(), "replicas": replicas}

    def _copy_of(self, owner: int) -> Tier:
        """(this node) the tier holding ``owner``'s copies here: its own, or its replicas."""
        return self.local if owner == self.topology.node else self.store(owner)

    # --- moving a node's copy between leaders -------------------------------------------

    def _run(self, plan: list[Transfer], group: Any) -> None:
        """Every leader works through the same ``plan``: it sends what it holds (on a thread,
        in plan order) while it receives what it is owed (here, in plan order), so a ring of
        nodes moves all its copies at once; between two leaders the messages keep the plan's
        order at both ends (point to point on ``group``; no other rank takes part)."""
        if not self.topology.leader:
            return
        me, leaders = self.topology.node, self.topology.leaders
        sends = [t for t in plan if t.src == me and t.dst != me]
        recvs = [t for t in plan if t.dst == me and t.src != me]
        errors: list[BaseException] = []

        def send_all() -> None:
            for t in sends:
                try:
                    send_copy(self._copy_of(t.owner), t.step, leaders[t.dst], group)
                except BaseException as e:  # noqa: BLE001 - raised below, after the receives
                    errors.append(e)

        sender = threading.Thread(target=send_all, name="distckpt-replicate")
        sender.start()
        try:
            for t in recvs:  # every transfer is received, even after a failed one: no sender waits forever
                try:
                    receive_copy(self._copy_of(t.owner), t.step, leaders[t.src], group)
                except OSError as e:
                    errors.append(e)
        finally:
            sender.join()
        if errors:
            raise errors[0]


def plan_repairs(
    views: dict[int, dict[str, Any]],
    nodes: int,
    partners: Callable[[int], list[int]] | None = None,
) -> tuple[list[Transfer], dict[int, list[int]]]:
    """From every leader's holdings: the transfers that restore each node's copy of every
    step that can be assembled (with ``partners``: and each partner's replica of it), and
    ``{step: [nodes]}`` for steps some node lost entirely. Pure and deterministic: every
    rank computes the same plan. Every transfer's source held the copy before the repair."""
    own = {n: set(views.get(n, {}).get("own", [])) for n in range(nodes)}
    replica_of: dict[int, dict[int, set[int]]] = {n: {} for n in range(nodes)}  # owner -> holder -> steps
    for holder, view in views.items():
        for owner, steps in view.get("replicas", {}).items():
            replica_of[int(owner)][holder] = set(steps)
    steps = set().union(*own.values(), *(s for d in replica_of.values() for s in d.values()))
    plans: dict[int, list[Transfer]] = {}
    lost = {}
    for step in sorted(steps):
        moves, missing = [], []
        for node in range(nodes):
            holders = sorted(h for h, s in replica_of[node].items() if step in s)
            if step not in own[node] and not holders:
                missing.append(node)
                continue
            if step not in own[node]:
                moves.append(Transfer(step, node, holders[0], node))
            source = node if step in own[node] else holders[0]
            for p in partners(node) if partners else []:
                if p != node and p not in holders:
                    moves.append(Transfer(step, node, source, p))
        if missing:
            if any(step in own[n] for n in range(nodes)):
                lost[step] = missing
            continue
        plans[step] = moves
    return [t for step in sorted(plans) for t in plans[step]], lost


def _tree_bytes(storage: Any, path: str) -> int:
    """Bytes of the files in ``path``; retention may be deleting that step meanwhile (on the
    memory tier it runs beside replication), and what is gone holds no memory."""
    total = 0
    for name in storage.listdir(path):  # [] once the directory is gone
        try:
            total += storage.size(storage.join(path, name))
        except FileNotFoundError:
            pass
    return total
