"""``distckpt verify``: every file of a step against its manifest (present, size, checksum).

The checks are the restore's own (``Catalog.file_problem``), spread over threads; a damaged
manifest is reported as a problem, not raised.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError
from ..layout.catalog import Catalog
from ..layout.manifest import MANIFEST


@dataclass(frozen=True)
class FileProblem:
    step: int
    name: str
    problem: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.name}: {self.problem}"


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking one step's files against its manifest."""

    step: int
    files: int
    nbytes: int
    problems: list[FileProblem]
    unlisted: list[str] = field(default_factory=list)  # present but not in the manifest (harmless)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_step(
    catalog: Catalog, step: int, *, progress: Callable[[int], None] | None = None, threads: int = 4
) -> VerifyReport:
    """Check every file of committed ``step``; ``progress(nbytes)`` is called (from worker
    threads) as bytes are checksummed."""
    try:
        man = catalog.read_manifest(step)
    except CorruptCheckpointError as e:
        return VerifyReport(step, 0, 0, [FileProblem(step, MANIFEST, str(e))])
    names = sorted(man.files)

    def check(name: str) -> str | None:
        return catalog.file_problem(step, man, name, progress=progress)

    with ThreadPoolExecutor(max(1, min(threads, len(names) or 1))) as pool:
        verdicts = list(pool.map(check, names))
    problems = [FileProblem(step, n, v) for n, v in zip(names, verdicts, strict=True) if v is not None]
    present = set(catalog.storage.listdir(catalog.step_path(step)))
    unlisted = sorted(present - set(names) - {MANIFEST})
    return VerifyReport(step, len(names), man.nbytes, problems, unlisted)
