"""Checkpoints written by real 2-rank jobs, and the helpers the CLI / transfer tests share."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch
from filelock import FileLock
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from distckpt import Checkpointer
from tests.support import REPO
from tests.support.harness import run_ranks
from tests.support.models import clone_state, make_training, train

WIDTH = 20  # FSDP2 splits dim 0 into two shards of 10 rows
VAL_LOSS = {1: 0.5, 2: 0.3, 3: 0.4}  # step 2 is the best, step 3 the newest


def fsdp_job(rank: int, world: int, url: str, options: dict | None) -> dict[int, dict] | None:
    """FSDP2 model + AdamW + an int tensor + a JSON dict, saved sharded at steps 1, 2, 3.

    Returns (on rank 0) the full model state of every step, for bit-exact comparisons."""
    model, _, sched = make_training(seed=0, width=WIDTH)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recoverables = {"model": model, "optim": optim, "ids": torch.arange(6), "cfg": {"lr": 0.01, "name": "tiny"}}
    full = {}
    with Checkpointer(url, recoverables, mode="sharded", storage_options=options) as ckpt:
        for step in (1, 2, 3):
            train(model, optim, sched, 1, seed=step)
            ckpt.save(step, meta={"val_loss": VAL_LOSS[step]})
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            full[step] = clone_state(state)
    return full if rank == 0 else None


def ddp_chief_job(rank: int, world: int, url: str) -> dict | None:
    """A DDP model saved in chief mode (rank 0 writes everything) at step 5."""
    model, optim, sched = make_training(seed=1, width=WIDTH)
    ddp = DDP(model)
    train(ddp, optim, sched, 2, seed=rank)
    with Checkpointer(url, {"model": ddp, "optim": optim}, mode="chief") as ckpt:
        ckpt.save(5, meta={"kind": "chief"})
    return clone_state(model.state_dict()) if rank == 0 else None


def shared_checkpoints(tmp_path_factory) -> dict:
    """The 2-rank FSDP2 (sharded) and DDP (chief) checkpoints, written once per test run.

    Under pytest-xdist every worker would otherwise write its own; the first worker to get
    here writes them, the others wait on a lock and reuse them. Tests never modify them
    (they clone first)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run only
    base = base / "shared-ckpts"
    with FileLock(str(base) + ".lock"):
        refs = base / "refs.pt"
        if not refs.exists():
            base.mkdir(exist_ok=True)
            full = run_ranks(fsdp_job, 2, str(base / "sharded"), None, timeout=240)[0]
            chief = run_ranks(ddp_chief_job, 2, str(base / "chief"), timeout=240)[0]
            torch.save({"full": full, "chief_state": chief}, base / "refs.tmp")
            os.replace(base / "refs.tmp", refs)
        saved = torch.load(refs, weights_only=True)
    return {"url": str(base / "sharded"), "chief": str(base / "chief"), **saved}


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the distckpt command as a user would: a new process, output captured.
    ``env`` adds variables (a value of None removes one)."""
    full = {**os.environ, "DISTCKPT_DEBUG": ""}
    full.pop("COLUMNS", None)  # piped output: rich tables as wide as they need
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run(
        [sys.executable, "-m", "distckpt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=full,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command: exactly one ``error:`` line and no traceback."""
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


class Store:
    """The same few file operations on a local root or on the S3 test server."""

    def __init__(self, options: dict | None) -> None:
        self.options = options
        if options is not None:
            import s3fs

            self.fs = s3fs.S3FileSystem(**options)

    def opts(self) -> list[str]:
        import json

        return ["--storage-options", json.dumps(self.options)] if self.options is not None else []

    def clone(self, url: str, dst: str) -> str:
        if self.options is None:
            shutil.copytree(url, dst, ignore=shutil.ignore_patterns(".distckpt-lock"))
        else:
            self.fs.copy(url, dst, recursive=True)
            lock = f"{dst}/.distckpt-lock"
            if self.fs.exists(lock):
                self.fs.rm_file(lock)
        return dst

    def read(self, path: str) -> bytes:
        if self.options is None:
            return open(path, "rb").read()
        return self.fs.cat_file(path)

    def write(self, path: str, data: bytes) -> None:
        if self.options is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").write(data)
        else:
            self.fs.pipe_file(path, data)

    def exists(self, path: str) -> bool:
        if self.options is None:
            return os.path.exists(path)
        self.fs.invalidate_cache()  # another process changed the bucket
        return self.fs.exists(path)

    def remove(self, path: str) -> None:
        os.remove(path) if self.options is None else self.fs.rm_file(path)

    def flip_byte(self, path: str, at: int) -> None:
        data = bytearray(self.read(path))
        data[at] ^= 0xFF
        self.write(path, bytes(data))
