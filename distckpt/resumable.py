"""Small recoverables that bit-exact resumption needs and users should not hand-roll."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from .tree import optional_numpy as _numpy


class RNGState:
    """Every random number generator of this process, saved per rank.

    Python's ``random``, NumPy's global generator, torch's CPU generator and, when CUDA
    is initialised, every CUDA device's. Add it as a recoverable (``{"rng": RNGState()}``);
    each rank gets back its own state, so dropout and sampling continue exactly.
    """

    distckpt_per_rank = True

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        np = _numpy()
        if np is not None:
            state["numpy"] = np.random.get_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_tuples(state["python"]))
        torch.set_rng_state(state["torch"])
        np = _numpy()
        if np is not None and "numpy" in state:
            np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"][: torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(cuda)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that remembers how far into the epoch it got.

    ``state_dict()`` is ``{"epoch", "offset"}``: after a restore, iterating resumes at the
    next sample this rank has not yet yielded, and ``sampler.epoch`` is the epoch to run.
    Exact with ``DataLoader(num_workers=0)``; with worker processes the loader reads ahead
    of training, so use torchdata's ``StatefulDataLoader`` (also a valid recoverable).
    Give the DataLoader its own ``generator=torch.Generator()``: otherwise every new
    iterator draws a seed from the global RNG, and a resumed run, which starts its
    iterator mid-epoch, would see a different random stream from then on.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.offset = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.offset >= len(indices):
            self.offset = 0  # a new pass over the same epoch
        for i in range(self.offset, len(indices)):
            self.offset = i + 1
            yield indices[i]

    def state_dict(self) -> dict[str, int]:
        if self.offset >= self.num_samples:  # the epoch is finished: resume at the next one
            return {"epoch": self.epoch + 1, "offset": 0}
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
