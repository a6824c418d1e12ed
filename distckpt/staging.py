"""Stagers: copy a save's tensors somewhere the training loop will not touch.

The ``Stager`` seam. Call order for one save, on every rank that writes:
  1. (training thread) ``stage(tensors)`` returns copies; this is the only part of
     ``save()`` that blocks training, so it does nothing but the copy.
  2. (background thread) the copies are written to storage.
  3. (background thread) ``release(staged)`` once written; a pooled stager reuses the
     memory for the next save instead of allocating again.
"""

from __future__ import annotations

from typing import Protocol

import torch

try:  # DTensor lives here from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


class Stager(Protocol):
    name: str

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def release(self, staged: dict[str, torch.Tensor]) -> None: ...
    def close(self) -> None: ...


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory this rank owns: a DTensor's local shard, else itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def rewrap(original: torch.Tensor, local_copy: torch.Tensor) -> torch.Tensor:
    """``local_copy`` dressed as ``original`` (same DTensor mesh, placements, global shape)."""
    if DTensor is not None and isinstance(original, DTensor):
        return DTensor.from_local(
            local_copy,
            original.device_mesh,
            original.placements,
            run_check=False,
            shape=original.shape,
            stride=original.stride(),
        )
    return local_copy


class HostCopyStager:
    """A fresh host copy per save: simple, and right for CPU tensors and small states."""

    name = "host"

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for fqn, t in tensors.items():
            local = local_part(t).detach()
            out[fqn] = rewrap(t, local.to("cpu", copy=True))
        return out

    def release(self, staged: dict[str, torch.Tensor]) -> None:
        staged.clear()

    def close(self) -> None:
        pass
