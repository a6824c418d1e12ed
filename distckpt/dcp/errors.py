"""DCP's failures as distckpt's errors.

DCP raises ``CheckpointException`` (a ``BaseException``) carrying every failing rank's
exception and traceback; ``unwrap_dcp_errors`` turns it into one of ours that names each
rank's underlying error, and lets distckpt's own errors through as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError, DistckptError


@contextlib.contextmanager
def unwrap_dcp_errors(what: str, kind: type[DistckptError]) -> Iterator[None]:
    """Within the block, a DCP failure becomes ``kind``: a ``CheckpointError`` with each
    rank's error, or (reads) a ``CorruptCheckpointError`` saying to restore an older step."""
    try:
        yield
    except CheckpointException as e:
        causes = {rank: pair[0] for rank, pair in e.failures.items()}
        ours = [c for c in causes.values() if isinstance(c, DistckptError)]
        if ours:
            raise ours[0] from None
        if kind is CheckpointError:
            raise CheckpointError(
                f"{what} failed", {r: c for r, c in causes.items() if isinstance(c, Exception)}
            ) from None
        detail = "; ".join(
            f"rank {r}: {type(c).__name__}: {str(c).splitlines()[0] if str(c) else ''}"
            for r, c in sorted(causes.items())
        )
        raise kind(f"{what} failed ({detail}); this step is damaged, restore an older one") from None
