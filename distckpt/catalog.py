"""What is on storage: committed steps (by their manifests) and uncommitted leftovers.

The catalog is read by whichever rank asks. For decisions that every rank must share
(which step to restore), the chief reads it and broadcasts; ranks never decide from
their own listing, which NFS attribute caching can make disagree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from .commit import Commit
from .errors import CorruptCheckpointError, DistckptError
from .info import CheckpointInfo
from .log import log
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
from .retention import RetentionPolicy
from .storage import Storage


class Catalog:
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

    def candidate_steps(self) -> list[int]:
        """Step numbers with a step directory name (committed or not), ascending."""
        return sorted(s for s in map(parse_step_dirname, self._names()) if s is not None)

    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists (readable or not), ascending."""
        return [s for s in self.candidate_steps() if self.is_committed(s)]

    def check_root(self) -> None:
        """Refuse a root that is itself one checkpoint (a common slip), with the fix."""
        names = set(self._names())
        if MANIFEST in names or ".metadata" in names:
            kind = "a distckpt step" if MANIFEST in names else "a plain torch.distributed.checkpoint folder"
            raise DistckptError(
                f"{self.storage.url} is {kind}, not a checkpoint root; point the Checkpointer at the "
                "directory that holds the step_* folders (or load a plain DCP folder with dcp.load)"
            )

    def is_committed(self, step: int) -> bool:
        return self.storage.exists(self.storage.join(self.step_path(step), MANIFEST))

    def read_manifest(self, step: int) -> Manifest:
        path = self.storage.join(self.step_path(step), MANIFEST)
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"step {step} has no manifest at {path}; it is not committed") from e
        return self._parse_manifest(step, data, path)

    @staticmethod
    def _parse_manifest(step: int, data: bytes, path: str) -> Manifest:
        man = Manifest.from_json(data, path)
        if man.step != step:
            raise CorruptCheckpointError(f"{path} describes step {man.step}, not {step}; the directory was renamed")
        return man

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

    def file_problem(
        self, step: int, man: Manifest, name: str, *, verify: bool = True, progress: Callable[[int], None] | None = None
    ) -> str | None:
        """What is wrong with one file of a step against its manifest record (missing, another
        size, and with ``verify`` another checksum), or None when it is intact.
        ``progress(nbytes)`` is called as bytes are checksummed."""
        rec = man.files[name]
        path = self.storage.join(self.step_path(step), name)
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

    def read_state(self, step: int, man: Manifest) -> dict[str, Any]:
        """``state.json``, checked against the manifest's size and checksum."""
        path = self.storage.join(self.step_path(step), STATE_FILE)
        data = self.read_checked(step, man, STATE_FILE)
        try:
            return json.loads(data)
        except ValueError as e:
            raise CorruptCheckpointError(f"{path} is not valid JSON: {e}") from e

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
                out.append(self.info(self._parse_manifest(step, self.storage.read_bytes(path), path)))
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
        busy = set(active())
        out = []
        for name in names:
            path = self.storage.join(self.root, name)
            if path in busy:
                continue
            step = parse_step_dirname(name)
            if self.commit.is_leftover(name) or (step is not None and not self.is_committed(step)):
                out.append(path)
        return out

    def clean_leftovers(self, active: Callable[[], Iterable[str]] = tuple) -> None:
        for path in self.leftovers(active):
            try:
                self.storage.rmtree(path)
                log.info("removed uncommitted leftover %s", path)
            except OSError as e:
                log.warning("could not remove leftover %s (%s); will retry", path, e)

    def apply_retention(self, policy: RetentionPolicy, protect: Callable[[int], bool] = lambda s: False) -> list[int]:
        """Delete what ``policy`` does not keep; returns the deleted steps. Never the newest."""
        infos = self.list()
        if len(infos) <= 1:
            return []
        keep = policy.should_preserve(infos)
        newest = max(c.step for c in infos)
        deleted = []
        for info, kept in zip(infos, keep, strict=True):
            if kept or info.step == newest or protect(info.step):
                continue
            try:
                self.commit.delete(info.step)
                deleted.append(info.step)
            except OSError as e:
                log.warning("retention could not delete step %d (%s); will retry after the next save", info.step, e)
        if deleted:
            log.info("retention deleted steps %s", deleted)
        return deleted
