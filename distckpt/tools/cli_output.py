"""What the ``distckpt`` command prints: consoles, sizes, times, tables, progress bars.

Separate from the commands (``cli``) so that each command reads as: read, decide, print.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..layout.catalog import CheckpointInfo
from .inspection import StepContents

# Piped output (grep, files, CI logs) is not wrapped at rich's default 80 columns.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(highlight=False, width=_WIDTH, soft_wrap=True)  # lines never wrap; tables fit the width
err = Console(stderr=True, highlight=False)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 5)
    return f"{n / 1024**exp:.1f} {'KMGTP'[exp - 1]}iB"


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def meta_text(meta: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in meta.items())


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def progress(what: str, quiet: bool) -> Progress:
    return Progress(
        TextColumn(f"{escape(what)}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    )


def info_json(i: CheckpointInfo) -> dict[str, Any]:
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(i.time))
    return {
        "step": i.step,
        "url": i.url,
        "time": i.time,
        "time_iso": iso,
        "nbytes": i.nbytes,
        "world_size": i.world_size,
        "mode": i.mode,
        "meta": i.meta,
    }


def steps_table(url: str, infos: list[CheckpointInfo], kept_by: list[list[str]] | None = None) -> Table:
    """The committed steps; with ``kept_by``, a column naming the rules that keep each step
    ("delete" where none does)."""
    table = Table(title=f"committed checkpoints in {escape(url)}", title_justify="left")
    for col, just in (("step", "right"), ("saved", "left"), ("size", "right"), ("ranks", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_column("mode")
    table.add_column("meta", overflow="fold")
    if kept_by is not None:
        table.add_column("kept by")
    for n, i in enumerate(infos):
        row = [str(i.step), when(i.time), human_bytes(i.nbytes), str(i.world_size), i.mode, escape(meta_text(i.meta))]
        if kept_by is not None:
            row.append(", ".join(kept_by[n]) or "delete")
        table.add_row(*row)
    return table


def print_contents(contents: StepContents) -> None:
    """``distckpt inspect``'s human output: a summary line, then recoverables, tensors, objects."""
    i = contents.info
    out.print(
        f"step {i.step}  {escape(i.url)}\nsaved {when(i.time)} by {i.world_size} ranks, {i.mode} mode, "
        f"{human_bytes(i.nbytes)} in {len(contents.files)} files; meta: {escape(meta_text(i.meta)) or '-'}"
    )
    rec = Table(title="recoverables", title_justify="left")
    rec.add_column("name")
    rec.add_column("tensors", justify="right")
    rec.add_column("bytes", justify="right")
    for name, nbytes in contents.recoverables.items():
        count = sum(t.recoverable == name for t in contents.tensors)
        rec.add_row(escape(name), str(count), human_bytes(nbytes))
    out.print(rec)
    tab = Table(title="tensors", title_justify="left")
    for col in ("name", "shape", "dtype", "bytes", escape("stored as rank[slice]")):
        tab.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for t in contents.tensors:
        tab.add_row(escape(t.name), str(list(t.shape)), t.dtype, human_bytes(t.nbytes), short(t.sharding(), 60))
    out.print(tab)
    if contents.objects:
        obj = Table(title="objects (JSON in state.json)", title_justify="left")
        for col in ("name", "type", "value"):
            obj.add_column(col, overflow="fold")
        for o in contents.objects:
            obj.add_row(escape(o.name), o.type, escape(short(json.dumps(o.value, default=str), 60)))
        out.print(obj)
