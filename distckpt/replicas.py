"""Peer replicas of the node-local tier: a lost node's memory comes back from its partner.

With ``local_dir`` (e.g. on ``/dev/shm``) every node commits its own copy of each step
(its ranks' files, the manifest, ``state.json``). With ``replicas=r`` (default 1) each node
also keeps copies of the ``r`` nodes before it in a ring: node ``i``'s copy lives on nodes
``i+1 .. i+r`` (mod the node count) under ``<local_dir>/replicas/node-<i>``, itself a tier
with the same commit (files, then the manifest and an atomic rename): a replica is either
whole or absent. Everything goes over the job's own process group (gloo, point to point
between node leaders); nothing touches the remote tier.

Call order:
  1. (all ranks, save thread, after every node committed its copy) ``replicate(step)``:
     each node leader sends its node's copy to its partners and receives theirs; checksums
     are checked against the manifest before the replica is committed. The save is
     *protected* when this returns on every rank (it is part of the save: ``wait()`` on
     its handle returns then). A partner that fails makes the save fail on every rank; the
     step is still committed on every node and uploaded, only not protected.
  2. (all ranks, restore, before the step is chosen) ``repair()``: the leaders say what they
     hold; for every step that every node can assemble (its own copy, else a partner's
     replica), a node missing its copy receives it from the partner and commits it. Then the
     restore goes on as usual and reads the node-local tier; a step that cannot be assembled
     is left to the remote tier, with a log line that says which node lost both copies.
  3. (node leaders, after ``replicate``) ``prune(keep)``: replicas of the newest ``keep``
     steps of each partner are kept, as on the local tier itself.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .layout.manifest import MANIFEST, Manifest, checksum_bytes
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
            self.stores[owner] = Tier.open(f"replica-of-{owner}", url, None, shared=False)
            self.stores[owner].storage.makedirs(self.stores[owner].catalog.root)
        return self.stores[owner]

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
        self._run(plan, group, lambda t: self.local if t.owner == me else self.store(t.owner))
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
        """(node leaders) the newest ``keep`` replicas of each partner."""
        for node in range(self.topology.nodes):
            if self._holds_for(node):
                apply(Keep(last=keep), self.store(node).catalog)

    # --- 2. before a restore ------------------------------------------------------------

    def repair(self, group: Any) -> dict[int, list[int]]:
        """(all ranks, restore) Bring back every node's copy of every step that can be
        assembled; returns ``{step: [nodes that got their copy from a partner]}``."""
        held = self.ranks.agree(lambda: self.holdings() if self.topology.leader else None, "listing node memory")
        plan, lost = plan_repairs({h["node"]: h for h in held if h is not None}, self.topology.nodes)
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
        if plan:
            self.ranks.agree(
                lambda: self._run(plan, group, self._source_for_repair), "fetching node copies from partners"
            )
        repaired: dict[int, list[int]] = {}
        for t in plan:
            repaired.setdefault(t.step, []).append(t.dst)
        return repaired

    def _drop(self, lost: dict[int, list[int]]) -> None:
        """(node leaders) Remove this node's copies and replicas of steps no node can assemble."""
        stores = [self.local] + [self.store(o) for o in range(self.topology.nodes) if self._holds_for(o)]
        for tier in stores:
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

    def _source_for_repair(self, t: Transfer) -> Tier:
        return self.local if t.src == t.owner else self.store(t.owner)

    # --- moving a node's copy between leaders -------------------------------------------

    def _run(self, plan: list[Transfer], group: Any, source: Any) -> None:
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
                    self._send(source(t), t.step, leaders[t.dst], group)
                except BaseException as e:  # noqa: BLE001 - raised below, after the receives
                    errors.append(e)

        sender = threading.Thread(target=send_all, name="distckpt-replicate")
        sender.start()
        try:
            for t in recvs:  # every transfer is received, even after a failed one: no sender waits forever
                try:
                    self._receive(self.local if t.owner == me else self.store(t.owner), t.step, leaders[t.src], group)
                except OSError as e:
                    errors.append(e)
        finally:
            sender.join()
        if errors:
            raise errors[0]

    def _send(self, tier: Tier, step: int, dst: int, group: Any) -> None:
        """Everything is read first: a read error is sent as such, so the receiver is never
        left waiting for bytes that will not come."""
        try:
            catalog, storage = tier.catalog, tier.storage
            man = catalog.read_manifest(step)
            stepdir = catalog.step_path(step)
            names = sorted(n for n in storage.listdir(stepdir) if n != MANIFEST)
            blobs = [_read_tensor(storage, storage.join(stepdir, n)) for n in names]
        except Exception as e:
            _send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), dst, group)
            raise
        header = {"manifest": man.to_json().decode(), "names": names, "sizes": [b.numel() for b in blobs]}
        _send_bytes(json.dumps(header).encode(), dst, group)
        for blob in blobs:
            _send_tensor(blob, dst, group)

    def _receive(self, tier: Tier, step: int, src: int, group: Any) -> None:
        head = json.loads(_recv_bytes(src, group))
        if "error" in head:
            raise OSError(f"step {step}: rank {src} could not send its copy ({head['error']})")
        man = Manifest.from_json(head["manifest"].encode(), f"the manifest of step {step} from node leader {src}")
        workdir = tier.commit.workdir(step, f"replica-{src}")
        tier.commit.create_workdir(workdir)
        problems = []
        for name, size in zip(head["names"], head["sizes"], strict=True):
            data = memoryview(_recv_tensor(src, group).numpy())
            rec = man.files.get(name)
            if len(data) != size or (rec is not None and checksum_bytes(data) != rec.checksum):
                problems.append(name)
            tier.storage.write_bytes(tier.storage.join(workdir, name), data)
        if problems:  # everything was received (the sender is not left waiting); nothing is committed
            tier.commit.abort(workdir)
            raise OSError(f"step {step}: {problems} arrived damaged from rank {src}; the replica is not kept")
        if tier.catalog.is_committed(step):
            tier.commit.abort(workdir)
            return
        tier.commit.finish(workdir, man)


def plan_repairs(views: dict[int, dict[str, Any]], nodes: int) -> tuple[list[Transfer], dict[int, list[int]]]:
    """From every leader's holdings: the transfers that restore each node's copy of every
    step that can be assembled, and ``{step: [nodes]}`` for steps some node lost entirely.
    Pure and deterministic: every rank computes the same plan."""
    own = {n: set(views.get(n, {}).get("own", [])) for n in range(nodes)}
    replica_of: dict[int, dict[int, set[int]]] = {n: {} for n in range(nodes)}  # owner -> holder -> steps
    for holder, view in views.items():
        for owner, steps in view.get("replicas", {}).items():
            replica_of[int(owner)][holder] = set(steps)
    steps = set().union(*own.values(), *(s for d in replica_of.values() for s in d.values()))
    plan, lost = [], {}
    for step in sorted(steps):
        moves, missing = [], []
        for node in range(nodes):
            if step in own[node]:
                continue
            holders = sorted(h for h, s in replica_of[node].items() if step in s)
            if holders:
                moves.append(Transfer(step, node, holders[0], node))
            else:
                missing.append(node)
        if missing:
            if any(step in own[n] for n in range(nodes)):
                lost[step] = missing
            continue
        plan.extend(moves)
    return plan, lost


def _tree_bytes(storage: Any, path: str) -> int:
    return sum(storage.size(storage.join(path, n)) for n in storage.listdir(path))


def _read_tensor(storage: Any, path: str) -> torch.Tensor:
    """A file's bytes straight into a uint8 tensor (one copy, from the page cache)."""
    buf = torch.empty(storage.size(path), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with storage.open_read(path) as f:
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{path}: shorter than its size")
            done += n
    return buf


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
