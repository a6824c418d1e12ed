"""What a store guarantees, found out rather than assumed: does it honour exclusive creates?

distckpt's one-writer-per-root lease and the object-store commit marker rely on an
exclusive create (``O_EXCL`` locally, ``If-None-Match: *`` on S3): of two creators, one
wins. AWS S3, MinIO and moto honour it; several S3-compatible stores (older Ceph RGW, some
NAS gateways, s3rver) silently ignore the header and let the second create overwrite the
first. ``honours_exclusive_create`` probes it once per root and process: it creates a
uniquely named object twice, expecting the second to be refused, then removes it.

Where it is not honoured, the lease and the commit marker fall back to
write-then-read-back (``layout/lease.py``, ``layout/commit.py``), and say so at open.
"""

from __future__ import annotations

import os
import threading
import uuid

from ..log import log
from ..storage import Storage

PROBE_PREFIX = ".distckpt-probe-"
_cache: dict[str, bool] = {}
_lock = threading.Lock()


def honours_exclusive_create(storage: Storage, root: str) -> bool:
    """Whether ``write_bytes(..., exclusive=True)`` refuses an existing object under ``root``
    (probed once per storage URL and process; the probe object is removed again)."""
    key = storage.url
    with _lock:
        if key in _cache:
            return _cache[key]
    probe = storage.join(root, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    storage.write_bytes(probe, b"first", exclusive=True)
    try:
        storage.write_bytes(probe, b"second", exclusive=True)
        honoured = False
    except FileExistsError:
        honoured = True
    finally:
        try:
            storage.remove(probe)
        except OSError as e:  # harmless: a probe object is never listed as a step
            log.warning("could not remove the probe object %s (%s)", probe, e)
    if not honoured:
        log.warning(
            "%s ignores exclusive creates (If-None-Match: *): one writing job per root is kept by "
            "writing the lease, waiting %.1f s and reading it back (a job that starts within that window "
            "of another may be refused; it never silently takes over a live one). Give each job its own "
            "checkpoint directory",
            storage.url,
            settle_seconds(),
        )
    with _lock:
        _cache[key] = honoured
    return honoured


def settle_seconds() -> float:
    """How long a lease written on a store without exclusive creates must stay ours before it
    counts (``DISTCKPT_LEASE_SETTLE_S``, default 3 s): longer than any PUT takes to land."""
    return float(os.environ.get("DISTCKPT_LEASE_SETTLE_S", "3"))
