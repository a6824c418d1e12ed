"""One writing job per checkpoint root: a lease file, taken at start and checked at commit.

``<root>/.distckpt-lock`` (JSON) names the job that writes there. The chief creates it with
an exclusive create (``O_EXCL`` / S3 ``If-None-Match: *``); a second job is refused with a
message that says who holds the root. The holder refreshes the lease in the background, and
checks it still holds it before each commit, so a job whose lease was taken over stops
committing (fencing) instead of interleaving with the new holder.

A lease may be taken over when its holder is evidently gone: the same job restarted (same
``SLURM_JOB_ID`` or torchrun run id), a dead process on this host, or no refresh for
``stale_after`` seconds.

On a store that ignores exclusive creates (``guarantees.honours_exclusive_create``) the
lease is taken by reading first (a live holder is refused, as above), writing our document,
waiting ``settle_seconds()`` and reading it back: of two jobs that start at the same moment,
the one whose write landed last sees its own document and holds the root; the other sees
it and is refused. The race window is a write that takes longer than the settle time to
land; a job that lost a race it did not notice is fenced at its first commit (``check``).
A store that does not replace an object whole (s3rver writes it in place) can tear two
writes into an unreadable lease: then both jobs are refused, saying so.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..errors import CommitError, DistckptError
from ..log import log
from ..storage import Storage
from .guarantees import honours_exclusive_create, settle_seconds

LOCK = ".distckpt-lock"
STALE_AFTER_S = 600.0  # a lease not refreshed for this long is taken to be abandoned


def job_identity() -> str:
    """What stays the same when a job is restarted or requeued, and differs between jobs."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ.get('SLURM_CLUSTER_NAME', '')}:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


class Lease:
    """(chief only) Holds the root for this job. ``acquire`` at start, ``check`` before each
    commit, ``release`` at close; a daemon thread refreshes it every ``refresh_s``."""

    def __init__(
        self, storage: Storage, root: str, *, stale_after: float = STALE_AFTER_S, refresh_s: float = 60.0
    ) -> None:
        self.storage, self.root, self.path = storage, root, storage.join(root, LOCK)
        self.stale_after, self.refresh_s = stale_after, refresh_s
        self.nonce = uuid.uuid4().hex
        self.identity = job_identity()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> dict[str, Any]:
        return {
            "job": self.identity,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "nonce": self.nonce,
            "refreshed": time.time(),
        }

    def acquire(self) -> None:
        exclusive = honours_exclusive_create(self.storage, self.root)
        try:
            if not exclusive and self.storage.exists(self.path):
                raise FileExistsError(self.path)  # read first: never overwrite a holder's lease
            self._create(exclusive)
        except FileExistsError:
            other = self._read()
            reason = self._takeover_reason(other)
            if reason is None:
                raise DistckptError(self._busy_message(other)) from None
            log.warning("taking over %s from %s (%s)", self.path, other.get("job", "?"), reason)
            if exclusive:
                self._remove_quietly()
            try:
                self._create(exclusive)
            except FileExistsError:  # a third job got in between: it holds the root now
                raise DistckptError(self._busy_message(self._read())) from None
        self._thread = threading.Thread(target=self._refresh_loop, name="distckpt-lease", daemon=True)
        self._thread.start()

    def _create(self, exclusive: bool) -> None:
        """Write our lease: an exclusive create (``FileExistsError`` if there is one), or, on
        stores that ignore it, write, settle and read back."""
        data = json.dumps(self._doc()).encode()
        if exclusive:
            self.storage.write_bytes(self.path, data, exclusive=True)
            return
        self.storage.write_bytes(self.path, data)
        time.sleep(settle_seconds())
        now = self._read()
        if not now:  # on S3 or MinIO a PUT replaces an object whole: never seen there
            raise DistckptError(
                f"{self.path} is missing or unreadable right after this job wrote it: another job wrote it "
                f"at the same moment and {self.storage.url} does not replace objects whole, so neither job "
                "holds the root. Start one job again"
            )
        if now.get("nonce") != self.nonce:
            raise DistckptError(
                f"another job took {self.storage.url} at the same moment ({now.get('job', 'unknown')}); "
                + self._busy_message(now).split("; ", 1)[-1]
            )

    def _remove_quietly(self) -> None:
        try:
            self.storage.remove(self.path)
        except FileNotFoundError:
            pass

    def _read(self) -> dict[str, Any]:
        try:
            return read_lease(self.storage, self.path)
        except FileNotFoundError:
            return {}

    def _takeover_reason(self, other: dict[str, Any]) -> str | None:
        if other and other.get("job") == self.identity:
            return "the same job, restarted"
        return holder_gone(other, self.stale_after)

    def _busy_message(self, other: dict[str, Any]) -> str:
        if not other:
            return f"{self.path} exists but is unreadable; if no job writes to this root any more, delete it"
        age = lease_age(other)
        return (
            f"{self.storage.url} is in use by another job ({other.get('job')}, host {other.get('host')}, "
            f"pid {other.get('pid')}, alive {age:.0f} s ago); use another checkpoint directory, stop that "
            f"job, or, if it is gone, delete {self.path}"
        )

    def check(self) -> None:
        """Raise ``CommitError`` if another job has taken the root over since we took it."""
        doc = self._read()
        if doc.get("nonce") != self.nonce:
            raise CommitError(
                f"{self.storage.url} was taken over by another job ({doc.get('job', 'unknown')}); this job "
                "no longer commits there. Give each job its own checkpoint directory"
            )

    def refresh(self) -> None:
        if self._read().get("nonce") == self.nonce:  # write_bytes replaces atomically
            self.storage.write_bytes(self.path, json.dumps(self._doc()).encode())

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - a missed refresh only ages the lease
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._read().get("nonce") == self.nonce:
                self.storage.remove(self.path)
        except OSError as e:
            log.warning("could not release %s: %s", self.path, e)


def read_lease(storage: Storage, path: str) -> dict[str, Any]:
    """The lease document at ``path``, ``{}`` when it is unreadable; ``FileNotFoundError``
    when there is none."""
    try:
        doc = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def lease_age(doc: dict[str, Any]) -> float:
    """Seconds since the lease ``doc`` was last refreshed."""
    try:
        return max(0.0, time.time() - float(doc.get("refreshed") or 0))
    except (TypeError, ValueError):
        return math.inf


def holder_gone(doc: dict[str, Any], stale_after: float = STALE_AFTER_S) -> str | None:
    """Why the job holding lease ``doc`` is evidently gone (its process on this host has
    exited, or it stopped refreshing), or None while it may still be writing. An unreadable
    lease (``{}``) is never taken to be gone: do not guess."""
    if not doc:
        return None
    if doc.get("host") == socket.gethostname() and not _alive(doc.get("pid")):
        return f"its process {doc.get('pid')} on this host is gone"
    age = lease_age(doc)
    if age > stale_after:
        return f"not refreshed for {age:.0f} s"
    return None


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True
