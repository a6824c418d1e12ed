"""The restore path: choose -> check -> match -> load -> apply (README, "How it works").

1. (chief) list committed steps on every tier, rank them by the request (``select``),
   broadcast the list.
2. (all ranks) check the first candidate: manifest, ``state.json``, and the files' sizes
   (checksums with ``verify=True``), the files shared out between ranks; the verdicts are
   all-gathered. If any rank found a problem, every rank logs it and moves to the next
   candidate together - unless the step was asked for by number.
3. (all ranks) match the checkpoint against the recoverables (names, keys, shapes) and
   raise ``IncompatibleCheckpointError`` naming the key and both shapes on a mismatch.
4. (all ranks) DCP loads the tensors in place (resharding to this world size), then each
   recoverable gets its state back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .dcp import METADATA_KEY, NodeLocal, ReadCounter
from .engine import Engine
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointError,
    RemoteError,
)
from .layout.catalog import DCP_METADATA, CheckpointInfo, check_selection, select
from .layout.manifest import Manifest
from .layout.tier import Tier, Tiers
from .log import log
from .ranks import Ranks
from .recoverables import Adapter, ModuleAdapter, restoring
from .replicas import Replicator
from .topology import Topology
from .tree import dtype_from_name, join, split, tensor_refs


@dataclass
class _Plan:
    dest: dict[str, torch.Tensor] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)
    cast: list[str] = field(default_factory=list)


class Restorer:
    """Restores from the job's tiers (the fastest that holds a step first)."""

    def __init__(
        self,
        ranks: Ranks,
        topology: Topology,
        tiers: Tiers,
        engine: Engine,
        replicator: Replicator | None = None,
        *,
        repair: bool = True,
    ) -> None:
        self.ranks, self.topology, self.tiers, self.engine = ranks, topology, tiers, engine
        self.replicator = replicator  # replicas are read where they are in any case
        self.repairer = replicator if repair else None  # read_only: node memory is never written
        self.repaired: dict[int, list[int]] = {}  #: step -> nodes whose copy came from a partner
        self.node_local: NodeLocal | None = None  #: node-local tier: who holds each file of the step, where
        self.url = tiers.primary.storage.url
        self.last_read: list[ReadCounter] = []  #: per rank: what the last restore asked of storage

    def _candidates(self, selection: dict[str, Any]) -> list[tuple[int, list[str]]]:
        """(chief) steps to try, best first, each with the tiers that hold it (fastest first)."""
        if all(v is None for v in selection.values()):  # damaged manifests included: they fail their check loudly
            have = {t.name: set(t.catalog.committed_steps()) for t in self.tiers.all}  # one listing per tier
            steps = sorted(set().union(*have.values()), reverse=True)
            return [(s, [t.name for t in self.tiers.all if s in have[t.name]]) for s in steps]
        steps = [i.step for i in select(self.tiers.list(), **selection)]
        return [(s, self.tiers.holders(s)) for s in steps]

    def restore(
        self,
        adapters: dict[str, Adapter],
        *,
        verify: bool,
        strict: bool,
        step: int | None = None,
        **selection: Any,
    ) -> CheckpointInfo | None:
        """``selection``: ``min_key``, ``max_key``, ``predicate``, ``importance_key`` (``select``)."""
        selection["step"] = step
        check_selection(step, selection.get("min_key"), selection.get("max_key"), selection.get("importance_key"))
        try:
            return self._restore(adapters, verify, strict, selection)
        finally:
            if self.repairer is not None:
                self.repairer.refill()  # node memory is refilled from partners while training resumes

    def _restore(
        self, adapters: dict[str, Adapter], verify: bool, strict: bool, selection: dict[str, Any]
    ) -> CheckpointInfo | None:
        ranks, step = self.ranks, selection["step"]
        if self.repairer is not None and self.topology.nodes > 1:  # node memory first
            newest = all(v is None for v in selection.values())  # else every step first: any may be asked for
            group = ranks.group("rep") if self.repairer.active else None
            self.repaired = self.repairer.repair(group, now=not newest)
        candidates = ranks.agree(
            lambda: self._candidates(selection) if ranks.is_chief else None,
            "choosing a checkpoint to restore",
        )[0]
        if not candidates:
            if step is not None:
                raise NoCheckpointError(
                    f"step {step} is not a committed checkpoint in {self.url}; see Checkpointer.list()"
                )
            log.info("no committed checkpoint in %s (matching the request); starting fresh", self.url)
            return None
        failures = []
        for candidate, holders in candidates:
            for name in holders:
                tier = self.tiers.by_name[name]
                try:
                    man, state = self._check(tier, candidate, verify)
                    return self._load(tier, adapters, candidate, man, state, strict, verify)
                except (CheckpointError, CorruptCheckpointError) as e:
                    _raise_if_incompatible(e)
                    failures.append(f"step {candidate} ({name}): {e}")
                    log.warning(
                        "step %d cannot be restored from the %s tier (%s); all ranks move on together",
                        candidate,
                        name,
                        e,
                    )
            if step is not None:
                raise CorruptCheckpointError(f"step {step} cannot be restored: {'; '.join(failures)}")
        raise CorruptCheckpointError(
            f"no committed checkpoint in {self.url} could be restored ({'; '.join(failures)}); "
            "check the storage, or move the damaged step directories away to start fresh"
        )

    # --- 2. checking ------------------------------------------------------------------

    def _check(self, tier: Tier, step: int, verify: bool) -> tuple[Manifest, dict[str, Any]]:
        found: dict[str, Any] = {}

        def read() -> dict[str, Any]:
            man = tier.catalog.read_manifest(step)
            return {"manifest": man, "state": tier.catalog.read_state(step, man)}

        if tier.shared or self.topology.nodes < 2:
            self.ranks.agree(lambda: found.update(read()), f"reading the manifest of step {step}")  # each its own
        else:  # node-local: a replaced node's memory is empty until refilled; the chief's holds the step
            found.update(self.ranks.agree(lambda: read() if self.ranks.is_chief else None,
                                          f"reading the manifest of step {step}")[0])  # fmt: skip
        man = found["manifest"]
        self.node_local = local = self._node_local(tier, man, step)

        def check() -> None:
            in_load = _checked_while_loading(found["state"])
            if local is None:
                names = self.topology.files_to_check(tier, man)
            else:  # node-local copies: every file must be on some node; its first holder checks it
                gone = sorted(n for n, ranks in local.holders.items() if not ranks)
                if gone:
                    raise CorruptCheckpointError(f"step {step}: no node holds {gone[:5]}")
                names = [n for n, ranks in local.holders.items() if min(ranks) == self.ranks.rank]
            for name in names:
                # sizes always; checksums here only for files the load will not checksum itself
                problem = tier.catalog.file_problem(
                    step, man, name, verify=verify and not in_load(name), path=local.paths[name] if local else None
                )
                if problem is not None:
                    raise CorruptCheckpointError(f"step {step}: {name}: {problem}")

        self.ranks.agree(check, f"checking step {step}")
        return found["manifest"], found["state"]

    # --- 3 + 4. matching and loading ------------------------------------------------------

    def _load(
        self,
        tier: Tier,
        adapters: dict[str, Adapter],
        step: int,
        man: Manifest,
        state: dict[str, Any],
        strict: bool,
        verify: bool,
    ) -> CheckpointInfo:
        saved = state.get("recoverables", {})
        plan = self._plan(adapters, saved, state, strict, step)
        if plan.cast:
            log.warning(
                "step %d: %d tensors will be cast to this model's dtypes, e.g. %s", step, len(plan.cast), plan.cast[:3]
            )
        stepdir = tier.catalog.step_path(step)
        load = {k: v for k, v in plan.dest.items() if k not in plan.skip}
        contiguous = state.get("layout") == "contiguous"
        local = self.node_local
        files = man.files if verify or local else None  # node-local: sizes come from the manifest
        counts = self.ranks.agree(
            lambda: self.engine.read(
                load,
                stepdir,
                tier.storage,
                self.ranks,
                contiguous,
                shared=tier.shared,
                files=files,
                node_local=local,
                metadata=state.get(METADATA_KEY),
            ),
            f"reading step {step}",
        )
        self.last_read = [c or ReadCounter() for c in counts]

        def apply() -> None:
            with restoring(man.meta):
                self._apply(adapters, saved, plan, state, man, strict)

        self.ranks.agree(apply, f"applying step {step}")
        from_partners = self.repaired.get(step, []) if not tier.shared else []
        info = replace(tier.catalog.info(man), tier=f"{tier.name}+replica" if from_partners else tier.name)
        if from_partners:
            log.info("step %d: node(s) %s read their copy from a partner node's replica", step, from_partners)
        read = sum(c.bytes for c in self.last_read)
        log.info(
            "restored step %d from %s (%s tier; saved by %d ranks in %s mode); all ranks together read %.3f GB "
            "from storage (%.2fx the step's files), %.3f GB came from other ranks",
            step,
            info.url,
            tier.name,
            man.world_size,
            man.mode,
            read / 1e9,
            read / max(1, man.nbytes),
            sum(c.broadcast_bytes for c in self.last_read) / 1e9,
        )
        return info

    def _node_local(self, tier: Tier, man: Manifest, step: int) -> NodeLocal | None:
        """(all ranks) On a node-local tier with several nodes: which ranks' nodes hold each
        file of the step - in their own copy, or in a replica kept for a partner - and where
        this rank finds those. Asked of the files themselves, so a step saved by another
        number of ranks or nodes works too."""
        if tier.shared or self.topology.nodes < 2:
            return None
        storage = tier.storage
        dirs = [tier.catalog.step_path(step)]
        if self.replicator is not None:
            dirs += [store.catalog.step_path(step) for store in self.replicator.held_stores()]

        def mine() -> dict[str, str]:
            found: dict[str, str] = {}
            for d in dirs:  # committed steps only: work directories live elsewhere
                for name in man.files:
                    if name not in found and storage.exists(path := storage.join(d, name)):
                        found[name] = path
            return found

        seen = self.ranks.agree(mine, "listing node-local files")
        holders = {name: {r for r, paths in enumerate(seen) if name in paths} for name in man.files}
        given: dict[str, bytes] = {}
        if DCP_METADATA in holders and len(holders[DCP_METADATA]) < self.ranks.world_size:
            # every rank plans the load from DCP's metadata: a replaced node gets it from the chief
            # (whose node always holds its copy: repair() fetches that first)
            sent = self.ranks.agree(
                lambda: storage.read_bytes(seen[0][DCP_METADATA]) if self.ranks.is_chief else None,
                f"sending step {step}'s DCP metadata to the nodes that lack it",
            )[0]
            if DCP_METADATA not in seen[self.ranks.rank]:
                given[DCP_METADATA] = sent
        return NodeLocal(holders, seen[self.ranks.rank], given)

    def _apply(
        self,
        adapters: dict[str, Adapter],
        saved: dict[str, Any],
        plan: _Plan,
        state: dict[str, Any],
        man: Manifest,
        strict: bool,
    ) -> None:
        """(all ranks) Every recoverable gets its state back."""
        full = self.engine.full_state
        for name, adapter in adapters.items():
            if adapter.per_rank:
                self._apply_per_rank(name, adapter, state, man)
            elif name in saved:
                restored = join(saved[name], plan.dest)
                if plan.skip and isinstance(restored, dict):
                    restored = {k: v for k, v in restored.items() if f"{name}.{k}" not in plan.skip}
                adapter.load(restored, full, strict)

    def _plan(
        self, adapters: dict[str, Adapter], saved: dict[str, Any], state: dict[str, Any], strict: bool, step: int
    ) -> _Plan:
        """Every rank works out the same plan; mismatches raise on every rank together."""
        result: dict[str, _Plan] = {}

        def plan() -> None:
            result["plan"] = self._match(adapters, saved, state, strict, step)

        self.ranks.agree(plan, f"matching step {step} against the recoverables")
        return result["plan"]

    def _match(
        self, adapters: dict[str, Adapter], saved: dict[str, Any], state: dict[str, Any], strict: bool, step: int
    ) -> _Plan:
        table, per_rank = state.get("tensors", {}), state.get("per_rank", {})
        absent = [n for n in adapters if n not in saved and n not in per_rank]
        if absent and strict:
            raise IncompatibleCheckpointError(
                f"step {step} holds no {absent} (it has {sorted(saved) + sorted(per_rank)}); "
                "pass strict=False to restore the rest"
            )
        out, problems = _Plan(), []
        for name, adapter in adapters.items():
            if adapter.per_rank or name not in saved:
                continue
            _, have = split(adapter.target(self.engine.full_state, saved[name]), name)
            want = tensor_refs(saved[name])
            for fqn in want:
                spec = table.get(fqn)
                if spec is None:
                    raise CorruptCheckpointError(
                        f"step {step}: state.json names tensor {fqn!r} that DCP metadata lacks"
                    )
                shape, dtype = tuple(spec["shape"]), dtype_from_name(spec["dtype"])
                if fqn in have:
                    if tuple(have[fqn].shape) != shape:
                        problems.append(
                            f"{fqn}: checkpoint has shape {list(shape)}, this job has {list(have[fqn].shape)}"
                        )
                    elif have[fqn].dtype != dtype:
                        out.cast.append(fqn)
                    out.dest[fqn] = have[fqn]
                elif isinstance(adapter, ModuleAdapter):
                    (problems.append(f"{fqn}: in the checkpoint but not in the model") if strict else out.skip.add(fqn))
                    out.dest[fqn] = torch.empty(0)
                else:
                    out.dest[fqn] = torch.empty(shape, dtype=dtype)
            missing = sorted(have.keys() - set(want))
            if missing and strict:
                problems.append(f"{name}: {len(missing)} keys not in the checkpoint, e.g. {missing[:5]}")
        if problems:
            raise IncompatibleCheckpointError(
                f"step {step} does not fit this job:\n  "
                + "\n  ".join(problems[:20])
                + "\nRestore into the model the checkpoint was saved from, or use distckpt.transfer() / strict=False"
            )
        return out

    def _apply_per_rank(self, name: str, adapter: Adapter, state: dict[str, Any], man: Manifest) -> None:
        ranks = state.get("per_rank", {}).get(name) or []
        mine = ranks[self.ranks.rank] if self.ranks.rank < len(ranks) else None
        if mine is None:
            log.warning(
                "%r was saved per rank by %d ranks; rank %d has no saved state and keeps its own",
                name,
                man.world_size,
                self.ranks.rank,
            )
            return
        adapter.load(join(mine, {}), self.engine.full_state, True)


def _checked_while_loading(state: dict[str, Any]) -> Any:
    """Which files of a step the load reads whole and checksums on its own (``SharedReader``:
    the DCP data files of distckpt's own contiguous steps), so the check before it need not."""
    if state.get("layout") != "contiguous":
        return lambda name: False
    return lambda name: name.endswith(".distcp")


def _raise_if_incompatible(err: BaseException) -> None:
    """A mismatch between checkpoint and job is not corruption: never fall back over it."""
    errors = getattr(err, "errors", {}) or {}
    for exc in errors.values():
        if isinstance(exc, IncompatibleCheckpointError):
            raise exc
        if isinstance(exc, RemoteError) and exc.type_name == "IncompatibleCheckpointError":
            raise IncompatibleCheckpointError(str(exc).split(": ", 1)[-1]) from err
