"""transformers: a ``Trainer`` whose checkpoints and ``resume_from_checkpoint`` go through distckpt.

Replace ``Trainer(...)`` with ``DistckptTrainer(...)``; ``TrainingArguments`` (``save_steps``,
``save_strategy``, ``save_total_limit``, ``load_best_model_at_end``) and
``trainer.train(resume_from_checkpoint=True)`` (or a ``checkpoint-N`` path) keep working.

What a checkpoint is: the model, optimizer, scheduler, grad scaler and every process's RNGs
as distckpt step ``N`` (= ``global_step``) under ``<output_dir>/.distckpt`` (or
``checkpoint_url``), staged and written in the background, committed atomically,
checksummed, restored by every rank from the same step. ``<output_dir>/checkpoint-N`` is
still there for the Trainer to find, holding ``trainer_state.json`` and a link
(``distckpt.json``): it appears at once (a renamed hidden sibling), only after the step is
committed, so ``resume_from_checkpoint=True`` never picks a half-written checkpoint.
Model weights for ``from_pretrained`` still come from ``trainer.save_model()``.

Call order (the Trainer calls each on every process):
  1. ``_save_checkpoint``: one distckpt save (returns once staged); the main process's
     background thread then makes ``checkpoint-N`` and applies ``save_total_limit``
     (newest ``limit`` steps plus the best one stay; a step's directory goes with it).
  2. ``_load_from_checkpoint`` (weights, before ``prepare``): nothing yet for a distckpt
     checkpoint; ``_load_optimizer_and_scheduler`` (after ``prepare``): the whole restore;
     ``_load_rng_state`` (at the resumed epoch): the saved RNGs are applied then, as the
     Trainer does. A ``best_model_checkpoint`` that moved with the output directory is found.
  3. ``_load_best_model``: the model alone from the best step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from transformers import Trainer

from ..checkpointer import Checkpointer
from ..layout.catalog import CheckpointInfo
from ..resumable import RNGState
from .links import Link, Links, norm_url, read_link, root_beside, write_link_dir
from .links import checkpoint_options as checkpoint_options_for

__all__ = ["DistckptTrainer", "LINK_NAME"]

LINK_NAME = "distckpt.json"
STATE_NAME = "trainer_state.json"  # transformers' TRAINER_STATE_NAME


class DistckptTrainer(Trainer):
    """``transformers.Trainer`` with checkpoints through distckpt.

    Args (besides ``Trainer``'s own):
        checkpoint_url: the distckpt root (``s3://bucket/run``, a directory); default
            ``<output_dir>/.distckpt``.
        checkpoint_options: more ``Checkpointer`` options: ``mode`` (``"sharded"``, the
            default, or ``"chief"``), ``async_save`` (default ``True``), ``storage_options``,
            ``stager``, ``timeout``, ...
    """

    def __init__(
        self, *args: Any, checkpoint_url: str | None = None, checkpoint_options: dict | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_url = os.fspath(checkpoint_url) if checkpoint_url is not None else None
        self.checkpoint_options = checkpoint_options_for(checkpoint_options, "DistckptTrainer")
        self._links = Links(self.checkpoint_options.get("storage_options"))
        self._checkpointers: dict[str, Checkpointer] = {}
        self._rng = _SavedRNG()

    # --- saving -------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        folder = os.path.join(run_dir, f"checkpoint-{step}")
        if self.state.best_global_step:
            self.state.best_model_checkpoint = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
        self._update_stateful_callbacks()
        ckpt = self._checkpointer(run_dir)
        meta = {"transformers": {"global_step": step, "best_metric": self.state.best_metric}}
        handle = ckpt.save(step, meta)
        if self.args.should_save:
            files = {STATE_NAME: (json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n").encode()}
            limit, best = self.args.save_total_limit, self.state.best_global_step

            def publish(info: CheckpointInfo) -> None:
                write_link_dir(folder, LINK_NAME, ckpt.url, info.step, meta, files)
                _rotate(run_dir, self._links, ckpt.url, limit, best)

            self._links.after_commit(handle, publish)

    def _update_stateful_callbacks(self) -> None:
        from transformers.trainer_callback import ExportableState

        for cb in [c for c in [*self.callback_handler.callbacks, self.control] if isinstance(c, ExportableState)]:
            name, state = type(cb).__name__, cb.state()
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(state)
            else:
                self.state.stateful_callbacks[name] = state

    # --- restoring ----------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if _link(resume_from_checkpoint) is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # a distckpt checkpoint is restored whole in _load_optimizer_and_scheduler, after prepare

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        link = _link(checkpoint) if checkpoint else None
        if link is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        self._reader(link).restore(step=link.step)
        self._relocate_best(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or _link(checkpoint) is None:
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or _link(checkpoint) is None:
            return super()._load_rng_state(checkpoint)
        self._rng.apply()

    def _load_best_model(self) -> None:
        link = _link(self.state.best_model_checkpoint or "")
        if link is None:
            return super()._load_best_model()
        self.wait_for_checkpoints()
        with Checkpointer(link.root, {"model": self.model}, read_only=True, **self._read_options()) as ckpt:
            ckpt.restore(step=link.step)

    # --- lifecycle ----------------------------------------------------------------------

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint so far is committed and its ``checkpoint-N`` made."""
        for ckpt in self._checkpointers.values():
            ckpt.wait()
        self._links.flush()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self.wait_for_checkpoints()
            for ckpt in self._checkpointers.values():
                if not ckpt.read_only:
                    ckpt.delete()  # the steps save_total_limit dropped since the last commit
        finally:
            for ckpt in self._checkpointers.values():
                ckpt.close()
            self._checkpointers.clear()

    def _recoverables(self) -> dict[str, Any]:
        recs: dict[str, Any] = {"model": self.model, "rng": self._rng}
        if self.optimizer is not None:
            recs["optim"] = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.lr_scheduler is not None:
            recs["sched"] = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            recs["scaler"] = scaler
        return recs

    def _checkpointer(self, run_dir: str) -> Checkpointer:
        return self._open(root_beside(os.path.join(run_dir, "x"), self.checkpoint_url))  # <run_dir>/.distckpt

    def _reader(self, link: Link) -> Checkpointer:
        mine = root_beside(os.path.join(self.args.output_dir, "x"), self.checkpoint_url)
        return self._open(link.root, read_only=norm_url(link.root) != norm_url(mine))

    def _open(self, root: str, read_only: bool = False) -> Checkpointer:
        """The Checkpointer of ``root`` (built on first use: a collective, every process is in
        a save or a restore), with the current model, optimizer, ... as recoverables."""
        key = norm_url(root)
        if key not in self._checkpointers:
            if read_only:
                ckpt = Checkpointer(root, read_only=True, **self._read_options())
            else:
                ckpt = Checkpointer(root, keep=self._links.policy.for_root(root), **self.checkpoint_options)
                if self.checkpoint_url is None and self.args.should_save:
                    self._links.forget_unreachable(ckpt, _linked_steps(self.args.output_dir))
            self._checkpointers[key] = ckpt
        self._checkpointers[key].add_recoverables(self._recoverables())
        return self._checkpointers[key]

    def _read_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.checkpoint_options.items() if k in ("storage_options", "timeout", "mode")}

    def _relocate_best(self, checkpoint: str) -> None:
        """A ``best_model_checkpoint`` recorded before the output directory moved (transformers
        #48315): point it at the same ``checkpoint-N`` beside the one resumed from."""
        best = self.state.best_model_checkpoint
        if best and not os.path.isdir(best):
            moved = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), os.path.basename(best))
            if os.path.isdir(moved):
                self.state.best_model_checkpoint = moved


class _SavedRNG(RNGState):
    """Every process's RNGs, saved like ``RNGState``; a restore keeps them until the Trainer
    asks for them (``_load_rng_state``, at the resumed epoch, after data skipping)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state

    def apply(self) -> None:
        if self.pending is not None:
            super().load_state_dict(self.pending)
            self.pending = None


def _link(checkpoint: str) -> Link | None:
    try:
        return read_link(os.path.join(checkpoint, LINK_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _rotate(run_dir: str, links: Links, root: str, limit: int | None, best_step: int | None) -> None:
    """(main process, after a commit) ``save_total_limit``: keep the newest ``limit``
    checkpoints and the best one; remove the others' directories first (the Trainer never
    finds a step that is gone), then hand their steps to retention (deleted after the next
    commit, or when training ends)."""
    if not limit or limit <= 0:
        return
    linked = sorted(_linked_steps(run_dir))
    keep = set(linked[-limit:]) | ({best_step} if best_step in linked else set())
    for step in (s for s in linked if s not in keep):
        shutil.rmtree(os.path.join(run_dir, f"checkpoint-{step}"), ignore_errors=True)
        links.forget(root, step)


def _linked_steps(run_dir: str) -> set[int]:
    if not os.path.isdir(run_dir):
        return set()
    names = [n for n in os.listdir(run_dir) if _is_checkpoint_dir(run_dir, n)]
    return {link.step for n in names if (link := _link(os.path.join(run_dir, n))) is not None}


def _is_checkpoint_dir(run_dir: str, name: str) -> bool:
    head, _, num = name.partition("-")
    return head == "checkpoint" and num.isdigit() and os.path.isfile(os.path.join(run_dir, name, LINK_NAME))
