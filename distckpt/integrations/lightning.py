"""Lightning: ``Trainer(plugins=[DistckptCheckpointIO()])`` saves through distckpt.

Everything Lightning does with checkpoints keeps working: ``ModelCheckpoint`` (top-k,
``save_last``, ``every_n_*``), ``trainer.fit(model, ckpt_path="last")`` / ``"best"`` /
a path, SLURM's ``hpc_ckpt_*``. What changes is what lies behind each ``.ckpt`` path: a
*link* (``integrations.links``: a small JSON file) naming a committed distckpt step under a
root (by default ``<checkpoint dir>/.distckpt``, or ``url=``: S3, a local tier, ...).

Call order (Lightning's strategy decides who calls what):
  1. (rank 0) ``save_checkpoint(checkpoint, path)``: Lightning calls it on the global zero
     rank only (DDP, full-state FSDP), so the writer is a chief-mode Checkpointer of that
     process alone (``process_group="local"``): the dict is split into tensors (staged in
     host memory, then written on the background thread) and a JSON skeleton; it returns
     once staged. The link at ``path`` is written once the step is committed, then
     ``on_commit(path, info)`` runs: Lightning's missing "save finished" hook.
  2. (rank 0) ``remove_checkpoint(path)``: top-k removal; queued behind pending saves; the
     step it named is deleted after the next commit.
  3. (all ranks) ``load_checkpoint(path)``: every rank resumes, together (a collective:
     checksums checked, each byte read once and shared between ranks, damage found by any
     rank raised on every rank). A path that is not a link (a checkpoint written by
     Lightning itself) is read with ``torch.load(weights_only=True)``.
  4. (all ranks) ``teardown()``: waits for pending saves and links, applies deletions.

Nothing is pickled: the checkpoint dict's non-tensor values must be JSON-like (numbers,
strings, lists, dicts with str/int keys, tuples, None; ``save_hyperparameters()`` of such
values); anything else is refused at save time with the key that holds it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..checkpointer import Checkpointer
from ..errors import CheckpointError, DistckptError
from ..layout.catalog import CheckpointInfo
from .links import Links, first_free_step, parent, read_link, root_beside

try:  # the standalone package (``pip install pytorch-lightning``) first, then the unified one
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # pragma: no cover - only the ``lightning`` package installed
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

__all__ = ["DistckptCheckpointIO", "load"]

KEY = "lightning"  # the recoverable holding Lightning's checkpoint dict


class DistckptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves through distckpt.

    Args:
        url: the distckpt root for every checkpoint (``s3://bucket/run``, a directory);
            default: ``.distckpt`` inside each checkpoint's own directory, so that moving
            that directory keeps it whole.
        async_save: return from Lightning's save once tensors are staged (default).
        on_commit: ``fn(path, info)``, called on rank 0 (from a background thread) once the
            checkpoint at ``path`` is committed and its link written.
        **options: more ``Checkpointer`` options (``storage_options``, ``local_dir``,
            ``stager``, ``staging_budget``, ``write_threads``, ``timeout``, ...).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        async_save: bool = True,
        on_commit: Callable[[str, CheckpointInfo], None] | None = None,
        **options: Any,
    ) -> None:
        for name in ("mode", "keep", "process_group", "read_only", "recoverables"):
            if name in options:
                raise TypeError(f"DistckptCheckpointIO sets {name}= itself")
        self.url = os.fspath(url) if url is not None else None
        self.async_save = async_save
        self.options = options
        self.links = Links(options.get("storage_options"), on_commit)
        self._writers: dict[str, Checkpointer] = {}
        self._next_step: dict[str, int] = {}
        self._readers: dict[str, Checkpointer] = {}

    # --- Lightning's CheckpointIO -------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("DistckptCheckpointIO takes storage options in its constructor, not per save")
        path = os.fspath(path)
        root = root_beside(path, self.url)
        writer = self._writer(root, path)
        step = self._next_step[root]
        self._next_step[root] = step + 1
        meta = {
            "name": posixpath.basename(path),
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        }
        writer.add_recoverable(KEY, checkpoint)
        try:
            handle = writer.save(step, {KEY: meta})
        except CheckpointError as e:
            refused = next((err for err in e.errors.values() if isinstance(err, TypeError)), None)
            if refused is None:
                raise
            raise TypeError(
                f"{str(refused).split(': give it')[0]}: distckpt keeps Lightning's checkpoint as tensors "
                "and JSON values, never pickle; make that value a number, string, list or dict, or "
                "leave it out (save_hyperparameters(ignore=[...]))"
            ) from e
        finally:
            writer.add_recoverable(KEY, {})  # staged: Lightning's dict is not held any longer
        self.links.link_after_commit(handle, path, writer.url, {KEY: meta})
        if not self.async_save:
            self.links.flush()

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        path = os.fspath(path)
        self.links.flush()
        link = read_link(path, self.options.get("storage_options"))
        if link is None:  # a checkpoint Lightning wrote itself, before distckpt
            return torch.load(path, map_location="cpu", weights_only=True)
        if link.root in self._writers:
            self._writers[link.root].wait()
        reader = self._reader(link.root)
        state: dict[str, Any] = {}
        reader.add_recoverable(KEY, state)
        reader.restore(step=link.step)
        return state

    def remove_checkpoint(self, path: Any) -> None:
        self.links.unlink(os.fspath(path))

    def teardown(self) -> None:
        """Wait for every pending save and link, delete the steps no link reaches."""
        try:
            self.links.flush()
            for writer in self._writers.values():
                writer.wait()
                writer.delete()
        finally:
            for ckpt in [*self._writers.values(), *self._readers.values()]:
                ckpt.close()
            self._writers.clear()
            self._readers.clear()
            self.links.close()

    # --- helpers ------------------------------------------------------------------------

    def wait(self) -> None:
        """(rank 0) Block until every checkpoint saved so far is committed and linked."""
        self.links.flush()
        for writer in self._writers.values():
            writer.wait()

    def _writer(self, root: str, path: str) -> Checkpointer:
        if root not in self._writers:
            writer = Checkpointer(
                root,
                mode="chief",
                async_save=self.async_save,
                keep=self.links.policy.for_root(root),
                process_group="local",
                **self.options,
            )
            self._writers[root] = writer
            self._next_step[root] = first_free_step(writer)
            if self.url is None:  # the root holds this directory's checkpoints only
                self.links.forget_unreachable(writer, _linked_steps(parent(path)))
        return self._writers[root]

    def _reader(self, root: str) -> Checkpointer:
        if root not in self._readers:  # a collective: every rank is in load_checkpoint
            opts = {k: v for k, v in self.options.items() if k in ("storage_options", "timeout")}
            self._readers[root] = Checkpointer(root, mode="chief", read_only=True, **opts)
        return self._readers[root]


def _linked_steps(directory: str) -> set[int]:
    """Steps the links among ``directory``'s ``.ckpt`` files name."""
    steps = set()
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.endswith(".ckpt") and os.path.isfile(os.path.join(directory, name)):
            link = read_link(os.path.join(directory, name))
            steps |= {link.step} if link is not None else set()
    return steps


def load(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """(one process) The checkpoint dict behind a Lightning path written through
    ``DistckptCheckpointIO``: to inspect it, or for ``LightningModule`` weights outside a
    Trainer (``model.load_state_dict(load(path)["state_dict"])``)."""
    link = read_link(os.fspath(path), storage_options)
    if link is None:
        raise DistckptError(f"{path} is not a distckpt link; load it with torch.load(path, weights_only=True)")
    state: dict[str, Any] = {}
    group = "local" if dist.is_available() and dist.is_initialized() else None
    with Checkpointer(
        link.root, {KEY: state}, mode="chief", read_only=True, storage_options=storage_options, process_group=group
    ) as ckpt:
        ckpt.restore(step=link.step)
    return state
