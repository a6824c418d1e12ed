"""``manifest.json``: what a committed step holds, in plain JSON.

A step is committed only when its manifest exists at ``<root>/step_<12 digits>/manifest.json``;
the manifest lists every other file of the step with its size and XXH3-64 checksum, so a reader can
tell a complete step from a truncated or altered one without trusting directory listings.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
import xxhash

from ..errors import CorruptCheckpointError

FORMAT = "distckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
STEP_RE = re.compile(r"^step_(\d{12})$")
_CHUNK = 8 << 20


def step_dirname(step: int) -> str:
    if not 0 <= step < 10**12:
        raise ValueError(f"step must be an integer in [0, 1e12), got {step!r}")
    return f"step_{step:012d}"


def parse_step_dirname(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class FileRecord:
    """One file of a step, as written: name relative to the step directory."""

    name: str
    size: int
    checksum: str
    rank: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "checksum": self.checksum, "rank": self.rank}


class Checksum:
    """Incremental XXH3-64 (the ``xxhash`` package): tens of GB/s per core, so checksumming
    keeps up with any disk; it guards against corruption, not against an attacker."""

    name = "xxh3_64"

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()
        self.size = 0

    def update(self, data: Any) -> None:
        self._h.update(data)
        self.size += memoryview(data).nbytes

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def checksum_stream(stream: BinaryIO, progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Size and checksum of everything left in ``stream``; ``progress(nbytes)`` per chunk read."""
    c = Checksum()
    while chunk := stream.read(_CHUNK):
        c.update(chunk)
        if progress is not None:
            progress(len(chunk))
    return c.size, c.hexdigest()


def checksum_bytes(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"distckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    step: int
    world_size: int
    mode: str
    files: dict[str, FileRecord]
    meta: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=_versions)
    format_version: int = FORMAT_VERSION
    #: with node memory on several nodes: every rank's node and where each node's replicas live
    placement: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": self.format_version,
            "step": self.step,
            "time": self.time,
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)),
            "world_size": self.world_size,
            "mode": self.mode,
            "meta": self.meta,
            "versions": self.versions,
            "checksum": Checksum.name,
            "nbytes": self.nbytes,
            "files": {name: rec.as_json() for name, rec in sorted(self.files.items())},
        }
        if self.placement is not None:
            doc["placement"] = self.placement
        return json.dumps(doc, indent=1, allow_nan=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate; any defect is a ``CorruptCheckpointError`` naming ``where``."""
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError("not a distckpt manifest")
            if int(doc["format_version"]) > FORMAT_VERSION:
                raise ValueError(
                    f"format version {doc['format_version']} is newer than this distckpt "
                    f"understands ({FORMAT_VERSION}); upgrade distckpt"
                )
            files = {
                name: FileRecord(name, int(f["size"]), str(f["checksum"]), int(f.get("rank", 0)))
                for name, f in doc["files"].items()
            }
            if any("/" in n or n in ("", ".", "..") for n in files):
                raise ValueError("file names must be plain names inside the step directory")
            return cls(
                step=int(doc["step"]),
                world_size=int(doc["world_size"]),
                mode=str(doc["mode"]),
                files=files,
                meta=dict(doc.get("meta") or {}),
                time=float(doc["time"]),
                versions=dict(doc.get("versions") or {}),
                format_version=int(doc["format_version"]),
                placement=dict(doc["placement"]) if doc.get("placement") else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"{where} is not a valid distckpt manifest ({e}); delete that step directory or restore an older step"
            ) from e
