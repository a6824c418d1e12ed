"""The error hierarchy. Every message says what happened and what to do next."""

from __future__ import annotations

import errno

__all__ = [
    "DistckptError",
    "NoCheckpointError",
    "CorruptCheckpointError",
    "CheckpointError",
    "CommitError",
    "IncompatibleCheckpointError",
]


class DistckptError(Exception):
    """Root of every error distckpt raises on purpose."""


class NoCheckpointError(DistckptError):
    """A specific checkpoint was asked for and does not exist."""


class CorruptCheckpointError(DistckptError):
    """A committed checkpoint cannot be read: missing, truncated or altered files."""


class CommitError(DistckptError):
    """A checkpoint could not be made visible (committed) on storage."""


class IncompatibleCheckpointError(DistckptError):
    """The checkpoint is intact but does not fit what is being restored into it."""


class CheckpointError(DistckptError):
    """A save or restore failed on one or more ranks.

    Raised on *every* rank, so that no rank is left waiting in a collective.
    ``errors`` maps each failing rank to its exception (a ``RemoteError`` for
    ranks other than this one).
    """

    def __init__(self, message: str, errors: dict[int, BaseException] | None = None):
        self.message = message
        self.errors: dict[int, BaseException] = dict(errors or {})
        detail = "; ".join(f"rank {r}: {_one_line(e)}" for r, e in sorted(self.errors.items()))
        super().__init__(f"{message} ({detail})" if detail else message)


class RemoteError(DistckptError):
    """An exception that happened on another rank, carried here as text."""

    def __init__(self, rank: int, type_name: str, message: str, traceback_text: str = ""):
        self.rank, self.type_name, self.traceback_text = rank, type_name, traceback_text
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self):
        return (RemoteError, (self.rank, self.type_name, str(self).split(": ", 1)[-1], self.traceback_text))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    head = text[0] if text else ""
    if isinstance(exc, (RemoteError, DistckptError)):
        return head
    return f"{type(exc).__name__}: {head}"


_FULL = (errno.ENOSPC, errno.EDQUOT)


def explain_storage_error(err: BaseException, url: str, step: int) -> BaseException:
    """What a low-level storage error means for the user, and what to do (``err`` itself
    when there is nothing to add)."""
    causes = list(getattr(err, "errors", {}).values()) or [err]
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return DistckptError(
                f"no space left where {url} lives while writing step {step} ({cause}); free space or keep "
                "fewer checkpoints (keep=distckpt.Keep(last=...)); earlier committed steps are intact"
            )
    return err


def out_of_space(err: CheckpointError) -> bool:
    """``err`` (a save's, on this rank) came from a full disk or quota (ENOSPC / EDQUOT),
    raw or as ``explain_storage_error`` or another rank put it."""
    for e in err.errors.values():
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno in _FULL:
                return True
            if "no space left" in str(cause).lower():  # explained, or from another rank
                return True
            cause = cause.__cause__
    return False
