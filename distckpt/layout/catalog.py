"""What is on storage: committed steps (by their manifests) and uncommitted leftovers.

The catalog is read by whichever rank asks. For decisions that every rank must share
(which step to restore), the chief reads it and broadcasts; ranks never decide from their
own listing, which NFS attribute caching can make disagree. ``CheckpointInfo`` is how a
committed step looks to users; ``select`` is the one ranking of steps that ``restore``,
``find`` and the tools share.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError, DistckptError, NoCheckpointError
from ..gc_paused import gc_paused
from ..log import log
from ..storage import PosixStorage, Storage
from .commit import Commit
from .manifest import (
    MANIFEST,
    STATE_FILE,
    Checksum,
    Manifest,
    checksum_bytes,
    checksum_stream,
    parse_step_dirname,
    step_dirname,
)

DCP_METADATA = ".metadata"  # DCP's own index file, one per step
_ASK_AT_ONCE = 16  # manifests asked for at the same time on an object store


@dataclass(frozen=True, kw_only=True)
class SaveStats:
    """Where the time of one save went (seconds) and how much it moved.

    ``stall_s`` is what the training loop waited for inside ``save()``;
    ``stage_s`` the device-to-host copy within it; ``write_s`` this rank's file writes;
    ``commit_s`` the cross-rank gather plus manifest and atomic commit; ``held_s``, under
    ``snapshot="overlap"``, what optimizer steps after ``save()`` waited for the rest of the
    copy (training time lost too; as far as known when the save commits).
    """

    stall_s: float = 0.0
    stage_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0
    bytes_written: int = 0
    staging_bytes: int = 0
    held_s: float = 0.0

    @property
    def write_gbps(self) -> float:
        """This rank's write throughput in GB/s (1e9 bytes)."""
        return self.bytes_written / self.write_s / 1e9 if self.write_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dataclasses.asdict(self)
        out["write_gbps"] = self.write_gbps
        return out


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint: read from its manifest, never from a directory name alone."""

    step: int
    url: str
    meta: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    world_size: int = 1
    mode: str = "sharded"
    nbytes: int = 0
    stats: SaveStats | None = None
    tier: str = "primary"

    def __repr__(self) -> str:
        return (
            f"CheckpointInfo(step={self.step}, url={self.url!r}, mode={self.mode!r}, "
            f"world_size={self.world_size}, nbytes={self.nbytes}, meta={self.meta!r})"
        )


class Catalog:
    """The committed steps and leftovers under one root (read-only, except ``delete``)."""

    def __init__(self, storage: Storage, commit: Commit) -> None:
        self.storage, self.commit = storage, commit
        self.root: str = storage.root

    def step_path(self, step: int) -> str:
        return self.storage.join(self.root, step_dirname(step))

    def step_url(self, step: int) -> str:
        return f"{self.storage.url.rstrip('/')}/{step_dirname(step)}"

    def _names(self) -> list[str]:
        try:
            return self.storage.listdir(self.root)
        except NotADirectoryError as e:
            raise DistckptError(f"{self.storage.url} is a file; point the Checkpointer at a directory") from e

    # --- which steps -------------------------------------------------------------------

    def candidate_steps(self) -> list[int]:
        """Step numbers with a step directory name (committed or not), ascending."""
        return sorted(s for s in map(parse_step_dirname, self._names()) if s is not None)

    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists (readable or not), ascending. On an object store the
        manifests are asked for at once (one round trip, not one per step)."""
        steps = self.candidate_steps()
        if len(steps) < 2 or isinstance(self.storage, PosixStorage):
            return [s for s in steps if self.is_committed(s)]
        with ThreadPoolExecutor(min(_ASK_AT_ONCE, len(steps)), thread_name_prefix="distckpt-list") as pool:
            return [s for s, yes in zip(steps, pool.map(self.is_committed, steps), strict=True) if yes]

    def is_committed(self, step: int) -> bool:
        return self.storage.exists(self.storage.join(self.step_path(step), MANIFEST))

    def resolve(self, step: int | None = None) -> int:
        """``step`` if it is committed, else the newest committed step; ``NoCheckpointError``
        (saying what there is) otherwise."""
        if step is not None:
            if self.is_committed(step):
                return step
            have = ", ".join(map(str, self.committed_steps()[-10:])) or "none"
            raise NoCheckpointError(
                f"step {step} is not a committed checkpoint in {self.storage.url} (committed: {have}); "
                f"pick one from `distckpt ls {self.storage.url}`"
            )
        for candidate in reversed(self.candidate_steps()):  # newest first: one check, usually
            if self.is_committed(candidate):
                return candidate
        raise NoCheckpointError(
            f"no committed checkpoint in {self.storage.url}; see `distckpt ls {self.storage.url}` "
            "(a garbage or empty directory, or the job has not saved yet)"
        )

    def check_root(self) -> None:
        """Refuse a root that is itself one checkpoint (a common slip), with the fix."""
        names = set(self._names())
        if MANIFEST in names or DCP_METADATA in names:
            kind = "a distckpt step" if MANIFEST in names else "a plain torch.distributed.checkpoint folder"
            raise DistckptError(
                f"{self.storage.url} is {kind}, not a checkpoint root; point the Checkpointer at the "
                "directory that holds the step_* folders (or load a plain DCP folder with dcp.load)"
            )

    # --- reading one step ----------------------------------------------------------------

    def read_manifest(self, step: int) -> Manifest:
        path = self.storage.join(self.step_path(step), MANIFEST)
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"step {step} has no manifest at {path}; it is not committed") from e
        return _parse_manifest(step, data, path)

    def read_checked(self, step: int, man: Manifest, name: str) -> bytes:
        """A small file of a step, read whole and checked against the manifest's size and checksum."""
        rec = man.files.get(name)
        if rec is None:
            raise CorruptCheckpointError(f"step {step}: manifest lists no {name}")
        path = self.storage.join(self.step_path(step), name)
        data = self.storage.read_bytes(path)
        if len(data) != rec.size or checksum_bytes(data) != rec.checksum:
            raise CorruptCheckpointError(
                f"{path} does not match its manifest (size or checksum); restore an older step"
            )
        return data

    def read_state(self, step: int, man: Manifest) -> dict[str, Any]:
        """``state.json``, checked against the manifest's size and checksum."""
        data = self.read_checked(step, man, STATE_FILE)
        try:
            with gc_paused():  # a few objects per tensor: ~1 s of collector passes per 100k tensors
                return json.loads(data)
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.step_path(step)}/{STATE_FILE} is not valid JSON: {e}") from e

    def file_problem(
        self,
        step: int,
        man: Manifest,
        name: str,
        *,
        verify: bool = True,
        progress: Callable[[int], None] | None = None,
        path: str | None = None,
    ) -> str | None:
        """What is wrong with one file of a step against its manifest record (missing, another
        size, and with ``verify`` another checksum), or None when it is intact.
        ``progress(nbytes)`` is called as bytes are checksummed; ``path``: where the file is,
        when not in the step's directory (a node's replica of it)."""
        rec = man.files[name]
        path = path or self.storage.join(self.step_path(step), name)
        try:
            size = self.storage.size(path)
        except FileNotFoundError:
            return "missing"
        if size != rec.size:
            return f"{size} bytes, the manifest says {rec.size} (truncated or overwritten)"
        if not verify:
            return None
        with self.storage.open_read(path) as f:
            size, digest = checksum_stream(f, progress)
        if size != rec.size:
            return f"read {size} bytes, the manifest says {rec.size}"
        if digest != rec.checksum:
            return f"checksum mismatch ({Checksum.name} {digest}, manifest {rec.checksum}): the file is corrupt"
        return None

    # --- listing ---------------------------------------------------------------------------

    def info(self, man: Manifest) -> CheckpointInfo:
        return CheckpointInfo(
            step=man.step,
            url=self.step_url(man.step),
            meta=man.meta,
            time=man.time,
            world_size=man.world_size,
            mode=man.mode,
            nbytes=man.nbytes,
        )

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first. A step whose manifest is damaged is skipped with a warning."""
        out = []
        for step in self.candidate_steps():
            path = self.storage.join(self.step_path(step), MANIFEST)
            try:  # one request per step: a missing manifest means "not committed"
                out.append(self.info(_parse_manifest(step, self.storage.read_bytes(path), path)))
            except FileNotFoundError:
                continue
            except (CorruptCheckpointError, OSError) as e:
                log.warning("skipping step %d: %s", step, e)
        return out

    def leftovers(self, active: Callable[[], Iterable[str]] = tuple) -> list[str]:
        """Paths of uncommitted work (interrupted saves, half-finished deletes), except the
        work directories ``active()`` names. It is asked *after* listing: a save registers its
        directory before creating it, so anything listed and still in flight is named."""
        names = self._names()
        found = active()
        busy = found if isinstance(found, Container) else set(found)
        out = []
        for name in names:
            path = self.storage.join(self.root, name)
            if path in busy:
                continue
            step = parse_step_dirname(name)
            if self.commit.is_leftover(name) or (step is not None and not self.is_committed(step)):
                out.append(path)
        return out

    # --- removing --------------------------------------------------------------------------

    def clean_leftovers(self, active: Callable[[], Iterable[str]] = tuple) -> None:
        for path in self.leftovers(active):
            try:
                self.storage.rmtree(path)
                log.info("removed uncommitted leftover %s", path)
            except OSError as e:
                log.warning("could not remove leftover %s (%s); will retry", path, e)

    def delete(self, steps: Iterable[int], recycle: bool = False) -> tuple[list[int], dict[int, OSError]]:
        """Un-commit and remove ``steps``; returns those deleted and the failures (not raised:
        one stuck step must not stop the rest). ``recycle``: see ``Commit.delete``."""
        deleted, failed = [], {}
        for step in steps:
            try:
                self.commit.delete(step, recycle)
                deleted.append(step)
            except OSError as e:
                failed[step] = e
        return deleted, failed


def select(
    infos: Sequence[CheckpointInfo],
    step: int | None = None,
    min_key: str | None = None,
    max_key: str | None = None,
    predicate: Callable[[CheckpointInfo], bool] | None = None,
    importance_key: Callable[[CheckpointInfo], Any] | None = None,
) -> list[CheckpointInfo]:
    """Committed checkpoints in the order a restore tries them: exactly ``step``; else those
    ``predicate`` accepts, best by ``meta[min_key]`` / ``meta[max_key]`` / the highest
    ``importance_key(info)`` (SpeechBrain's), or newest first. Ties go to the newer step."""
    check_selection(step, min_key, max_key, importance_key)
    if step is not None:
        return [i for i in infos if i.step == step]
    chosen = [i for i in infos if predicate is None or predicate(i)]
    if importance_key is None and min_key is None and max_key is None:
        return sorted(chosen, key=lambda i: -i.step)
    if importance_key is None:
        key = min_key or max_key
        sign = -1 if min_key else 1

        def importance_key(i: CheckpointInfo) -> Any:
            value = metric_value(i.meta.get(key))
            return None if value is None else sign * value

    scored = [(v, i) for i in chosen if (v := metric_value(importance_key(i))) is not None]
    return [i for _, i in sorted(scored, key=lambda vi: (-vi[0], -vi[1].step))]


def check_selection(
    step: int | None, min_key: str | None, max_key: str | None, importance_key: Callable[..., Any] | None = None
) -> None:
    if sum(x is not None for x in (step, min_key, max_key, importance_key)) > 1:
        raise ValueError("give at most one of step=, min_key=, max_key=, importance_key=")


def metric_value(value: Any) -> float | None:
    """A meta value as a number to rank by, or None (missing, non-numeric, bool or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if value != value else float(value)  # NaN is the one value unequal to itself


def _parse_manifest(step: int, data: bytes, path: str) -> Manifest:
    man = Manifest.from_json(data, path)
    if man.step != step:
        raise CorruptCheckpointError(f"{path} describes step {man.step}, not {step}; the directory was renamed")
    return man


def encode_state(state: dict[str, Any], catalog: dict[str, Any], encoded: dict[str, tuple[Any, str]]) -> bytes:
    """``state.json``'s bytes (``Catalog.read_state`` reads them back): ``state`` and
    ``catalog`` (the tensor table and DCP's index, ``dcp.write_items``) as one JSON object.
    A save planned like the last one hands over the very same catalog objects
    (``plan_cache``): their text is kept in ``encoded`` and not made again (100,000 tensors:
    0.3 s per save)."""
    parts = [json.dumps(state, allow_nan=True)[:-1]]  # state is never empty
    for key, value in catalog.items():
        kept = encoded.get(key)
        if kept is None or kept[0] is not value:
            kept = encoded[key] = (value, json.dumps(value, allow_nan=True))
        parts.append(f", {json.dumps(key)}: {kept[1]}")
    return ("".join(parts) + "}").encode()
