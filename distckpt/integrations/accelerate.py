"""Accelerate: an ``Accelerator`` whose ``save_state``/``load_state`` go through distckpt.

Replace ``Accelerator(...)`` with ``DistckptAccelerator(...)`` and keep calling
``accelerator.save_state(...)`` / ``accelerator.load_state(...)``: the same objects are
saved (prepared models, optimizers, schedulers, the grad scaler, every process's RNGs,
data-loader positions, ``register_for_checkpointing`` objects, ``accelerator.step``), as
one distckpt step: staged and written in the background, committed atomically, checksummed,
restored by every rank from the same step, resharded when the number of processes changes.

Where the checkpoints go:
  * ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)``: the root is
    ``<project_dir>/checkpoints`` (or ``checkpoint_url``), step = ``save_iteration``,
    retention keeps the newest ``N``; ``load_state()`` restores the newest committed step
    (a damaged one is skipped by every rank together).
  * ``save_state("out/ckpt_7")``: ``out/ckpt_7/distckpt.json`` is a link (see ``links``) to a
    step under ``out/.distckpt`` (or ``checkpoint_url``), written once the step commits;
    ``load_state("out/ckpt_7")`` restores it. Saving to the same directory again replaces
    the link and the old step is deleted after the next commit.

Call order: every process calls ``save_state`` and ``load_state`` (collectives, as in
Accelerate); the main process alone writes links. ``wait_for_checkpoints()`` blocks until
every save so far is committed; ``end_training()`` does that and closes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.utils import DistributedType

from ..checkpointer import Checkpointer
from ..errors import DistckptError, NoCheckpointError
from ..resumable import RNGState
from ..retention import Keep
from .links import Links, first_free_step, read_link, root_beside
from .links import checkpoint_options as checkpoint_options_for

__all__ = ["DistckptAccelerator", "LINK_NAME"]

LINK_NAME = "distckpt.json"  # the link inside an explicit save_state directory
_SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP)


class DistckptAccelerator(Accelerator):
    """``accelerate.Accelerator`` with ``save_state``/``load_state`` through distckpt.

    Args (besides ``Accelerator``'s own):
        checkpoint_url: one distckpt root for every save (``s3://bucket/run``, a directory);
            default: see the module doc.
        checkpoint_options: more ``Checkpointer`` options: ``mode`` (``"sharded"``, the
            default, or ``"chief"``), ``async_save`` (default ``True``), ``storage_options``,
            ``local_dir``, ``stager``, ``timeout``, ...
    """

    def __init__(
        self, *args: Any, checkpoint_url: str | None = None, checkpoint_options: dict | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_url = os.fspath(checkpoint_url) if checkpoint_url is not None else None
        self.checkpoint_options = checkpoint_options_for(checkpoint_options, "DistckptAccelerator")
        self._links = Links(self.checkpoint_options.get("storage_options"))
        self._checkpointers: dict[str, Checkpointer] = {}
        self._next_step: dict[str, int] = {}
        self._rng = RNGState()

    def save_state(self, output_dir: str | None = None, safe_serialization: bool = True, **kwargs: Any) -> str:
        """Save everything Accelerate's ``save_state`` would, as one distckpt step (every
        process). Returns once tensors are staged (``async_save``); returns the checkpoint's
        directory (or, with automatic naming, the step's URL)."""
        self._check_supported()
        meta = {"accelerate": {"iteration": self.save_iteration, "step": self.step}}
        if self.project_configuration.automatic_checkpoint_naming:
            ckpt = self._open(self._auto_root())
            handle = ckpt.save(self.save_iteration, meta)
            self.project_configuration.iteration += 1
            return f"{ckpt.url}/step_{handle.step:012d}"
        if output_dir is None:
            raise ValueError("save_state() needs output_dir unless automatic_checkpoint_naming is on")
        output_dir = os.fspath(output_dir)
        root = root_beside(output_dir, self.checkpoint_url)  # <parent of output_dir>/.distckpt
        ckpt = self._open(root)
        step = self._next_step[root]
        self._next_step[root] = step + 1
        handle = ckpt.save(step, meta)
        if self.is_main_process:
            self._links.link_after_commit(handle, os.path.join(output_dir, LINK_NAME), ckpt.url, meta)
        self.project_configuration.iteration += 1
        return output_dir

    def load_state(self, input_dir: str | None = None, **kwargs: Any) -> None:
        """Restore everything ``save_state`` saved (every process, together): from
        ``input_dir``, or with automatic naming the newest committed step."""
        self._check_supported()
        self.wait_for_checkpoints()
        if input_dir is None:
            if not self.project_configuration.automatic_checkpoint_naming:
                raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
            info = self._open(self._auto_root()).restore()
            if info is None:
                raise NoCheckpointError(f"no committed checkpoint under {self._auto_root()}")
            self.project_configuration.iteration = info.step + 1
            return
        link_path = os.path.join(os.path.expanduser(os.fspath(input_dir)), LINK_NAME)
        try:
            link = read_link(link_path, self.checkpoint_options.get("storage_options"))
        except FileNotFoundError:
            link = None
        if link is None:
            raise NoCheckpointError(
                f"{input_dir} holds no distckpt checkpoint (no committed {LINK_NAME}: never saved, or its save "
                "did not commit). A directory written by accelerate's own save_state is read by "
                "accelerate.Accelerator.load_state (which unpickles: only for files you trust)."
            )
        self._open(link.root).restore(step=link.step)

    def wait_for_checkpoints(self) -> None:
        """Block until every save so far is committed (and, on the main process, linked)."""
        for ckpt in self._checkpointers.values():
            ckpt.wait()
        self._links.flush()

    def end_training(self) -> None:
        try:
            self.wait_for_checkpoints()
            for ckpt in self._checkpointers.values():
                ckpt.delete()
        finally:
            for ckpt in self._checkpointers.values():
                ckpt.close()
            self._checkpointers.clear()
            self._links.close()
        super().end_training()

    # --- helpers ------------------------------------------------------------------------

    def _check_supported(self) -> None:
        if self.distributed_type not in _SUPPORTED:
            raise DistckptError(
                f"DistckptAccelerator saves DDP, FSDP and single-process states; {self.distributed_type} "
                "keeps its own checkpoint format: use accelerate.Accelerator there"
            )
        if self._save_model_state_pre_hook or self._load_model_state_pre_hook:
            raise DistckptError(
                "DistckptAccelerator does not run save/load_state pre-hooks (they edit Accelerate's own "
                "files); give the object state_dict()/load_state_dict() and register_for_checkpointing() it"
            )

    def _auto_root(self) -> str:
        return self.checkpoint_url or os.path.join(self.project_dir, "checkpoints")

    def _open(self, root: str) -> Checkpointer:
        """The Checkpointer of ``root`` (built on first use: a collective), with the current
        prepared objects as its recoverables."""
        if root not in self._checkpointers:
            auto = self.project_configuration.automatic_checkpoint_naming and root == self._auto_root()
            limit = self.project_configuration.total_limit
            keep = (Keep(last=limit) if limit else None) if auto else self._links.policy.for_root(root)
            self._checkpointers[root] = Checkpointer(root, keep=keep, **self.checkpoint_options)
            self._next_step[root] = first_free_step(self._checkpointers[root])
        ckpt = self._checkpointers[root]
        ckpt.add_recoverables(self._recoverables())
        return ckpt

    def _recoverables(self) -> dict[str, Any]:
        recs: dict[str, Any] = {}
        for kind, objs in (("model", self._models), ("optim", self._optimizers), ("sched", self._schedulers)):
            for i, obj in enumerate(objs):  # the wrapped torch objects: FQN-keyed, reshardable state
                recs[kind if i == 0 else f"{kind}_{i}"] = getattr(obj, "optimizer", getattr(obj, "scheduler", obj))
        for i, loader in enumerate(self._dataloaders):
            recs["loader" if i == 0 else f"loader_{i}"] = _LoaderPosition(loader)
        for i, obj in enumerate(self._custom_objects):
            recs[f"custom_{i}"] = obj
        if self.scaler is not None:
            recs["scaler"] = self.scaler
        recs["rng"] = self._rng
        recs["accelerator"] = _Counters(self)
        return recs


class _Counters:
    """``accelerator.step`` (the gradient-accumulation counter) across a restore."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.accelerator.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


class _LoaderPosition:
    """A prepared data loader's position, per process: its epoch counter (``iteration``),
    the generator that shuffles it (Accelerate's own ``save_state`` leaves it out, so a
    resumed run would see other batches), a seedable sampler's epoch and seed, a stateful
    loader's own state."""

    distckpt_per_rank = True

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"iteration": getattr(self.loader, "iteration", None)}
        sampler = _sampler(self.loader)
        if isinstance(sampler, SeedableRandomSampler):
            state["sampler"] = {"epoch": sampler.epoch, "initial_seed": sampler.initial_seed}
        generator = getattr(self.loader, "synchronized_generator", None)
        if isinstance(generator, torch.Generator):  # the shuffling order of the epochs to come
            state["generator"] = generator.get_state()
        if getattr(self.loader, "use_stateful_dataloader", False):
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("iteration") is not None and hasattr(self.loader, "iteration"):
            self.loader.iteration = int(state["iteration"])
        sampler = _sampler(self.loader)
        if "sampler" in state and isinstance(sampler, SeedableRandomSampler):
            sampler.epoch, sampler.initial_seed = state["sampler"]["epoch"], state["sampler"]["initial_seed"]
        generator = getattr(self.loader, "synchronized_generator", None)
        if "generator" in state and isinstance(generator, torch.Generator):
            generator.set_state(state["generator"])
        if "loader" in state:
            self.loader.load_state_dict(state["loader"])


def _sampler(loader: Any) -> Any:
    get = getattr(loader, "get_sampler", None)
    return get() if callable(get) else getattr(loader, "sampler", None)
