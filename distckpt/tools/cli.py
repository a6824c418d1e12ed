"""The ``distckpt`` command: list, inspect, verify, clean up and export checkpoints.

A thin layer over ``distckpt.open`` (``reader``), ``gc``, ``export`` and ``distckpt.bench``;
what it prints is in ``cli_output``.
Every command works on any storage distckpt supports (a path, ``file://``, ``s3://`` with
``--storage-options`` or the usual AWS environment variables). Nothing here is a collective
or needs a process group. Errors are one line on stderr, ``error: <what>; <what to do>``,
with exit status 2; ``verify`` exits 1 when a file is damaged and names it.
"""

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from ..errors import DistckptError
from .cli_output import human_bytes, info_json, meta_text, out, print_contents, print_json, progress, steps_table
from .cli_policy import (
    AmongOpt,
    BestModeOpt,
    KeepBestOpt,
    KeepEveryOpt,
    KeepHoursOpt,
    KeepLastOpt,
    MetricOpt,
    NewerOpt,
    build_policy,
)

app = typer.Typer(
    name="distckpt",
    help="List, inspect, verify, clean up and export distckpt checkpoints (local, NFS, S3).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
F = TypeVar("F", bound=Callable[..., Any])

Url = Annotated[str, typer.Argument(help="checkpoint root (or one step's directory): a path, file://, s3://...")]
StorageOptions = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        "-o",
        envvar="DISTCKPT_STORAGE_OPTIONS",
        help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    ),
]
Step = Annotated[int | None, typer.Option("--step", "-s", help="step number (default: the newest committed)")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]


# --- plumbing ------------------------------------------------------------------------------


def _command(fn: F) -> F:
    """Run a command; any failure becomes one ``error:`` line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_logging()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI's contract: one line, never a traceback
            if os.environ.get("DISTCKPT_DEBUG"):
                raise
            print(f"error: {describe(e)}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def describe(e: BaseException) -> str:
    """One line saying what went wrong and what to do about it."""
    kind = type(e)
    module = kind.__module__ or ""
    text = " ".join(str(e).split()) or kind.__name__
    if isinstance(e, DistckptError):
        return text
    if module.startswith(("botocore", "aiobotocore")) and "Credential" in kind.__name__:
        return (
            f"no credentials for the object store ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            '(or AWS_PROFILE), or pass --storage-options \'{"key": ..., "secret": ...}\''
        )
    if module.startswith(("botocore", "aiobotocore", "aiohttp")):
        return (
            f"the object store failed: {text}; check the URL, the endpoint (--storage-options endpoint_url "
            "or AWS_ENDPOINT_URL) and the credentials"
        )
    if isinstance(e, PermissionError):
        return f"permission denied: {text}; check access rights or credentials for this location"
    if isinstance(e, FileNotFoundError):
        return f"not found: {text}; check the path or URL"
    if isinstance(e, (OSError, ValueError, TypeError)):
        return f"{text}; check the arguments (distckpt COMMAND --help)"
    return f"{kind.__name__}: {text}; this looks like a bug in distckpt, re-run with DISTCKPT_DEBUG=1 and report it"


def _quiet_logging() -> None:
    """Library warnings (a skipped damaged step) as plain one-line notes on stderr."""
    logger = logging.getLogger("distckpt")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def _options(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise DistckptError(f"--storage-options is not valid JSON ({e}); pass e.g. '{{\"anon\": true}}'") from None
    if not isinstance(value, dict):
        raise DistckptError('--storage-options must be a JSON object, e.g. \'{"endpoint_url": "http://..."}\'')
    return value


def _open(url: str, storage_options: str | None) -> Any:
    from .reader import CheckpointReader

    return CheckpointReader(url, _options(storage_options))


# --- commands ------------------------------------------------------------------------------


@app.command("ls")
@_command
def ls_cmd(
    url: Url,
    as_json: AsJson = False,
    keep_last: KeepLastOpt = None,
    keep_best: KeepBestOpt = None,
    metric: MetricOpt = None,
    best_mode: BestModeOpt = "min",
    keep_every: KeepEveryOpt = None,
    keep_every_hours: KeepHoursOpt = None,
    keep_newer_than: NewerOpt = None,
    among: AmongOpt = None,
    storage_options: StorageOptions = None,
) -> None:
    """Committed steps (step, time, size, world size, mode, meta); uncommitted leftovers apart.
    With retention options (as for gc), a column says which rule keeps each step."""
    from ..retention import kept_by

    policy = build_policy(keep_last, keep_best, metric, best_mode, keep_every, keep_every_hours, keep_newer_than, among)
    reader = _open(url, storage_options)
    infos, leftovers, lease = reader.list(), reader.leftovers(), reader.lease()
    _require_checkpoints(reader, infos, leftovers)
    reasons = kept_by(policy, infos) if policy is not None else None
    pointers = {name: (p.step if (p := reader.pointer(name)) else None) for name in ("latest", "best")}
    if as_json:
        steps = [info_json(i) for i in infos]
        for step, why in zip(steps, reasons or [], strict=False):
            step["kept_by"] = why
        doc = {"url": reader.url, "steps": steps, "leftovers": [vars(x) for x in leftovers], "lease": lease}
        print_json({**doc, "pointers": pointers})
        return
    out.print(steps_table(reader.url, infos, reasons))
    for name, step in pointers.items():
        if step is not None:
            out.print(f"{name}.json -> step {step}", markup=False)
    if lease is not None:
        state = "writing now" if lease["live"] else "stale"
        out.print(f"lease: {escape(str(lease.get('job')))} ({state}, refreshed {lease['age_s']:.0f} s ago)")
    if leftovers:
        out.print(f"\nuncommitted leftovers ({len(leftovers)}; never listed or restored; `distckpt gc` removes them):")
        for x in leftovers:
            out.print(f"  {x.name}  [{x.kind}]", markup=False)


def _require_checkpoints(reader: Any, infos: list[Any], leftovers: list[Any]) -> None:
    """A root with neither steps nor leftovers is a wrong URL or a foreign directory: say so."""
    if not infos and not leftovers:
        raise DistckptError(
            f"no distckpt checkpoints in {reader.url} (no committed step_* directories); point at the "
            "directory the job saves into"
        )


@app.command("inspect")
@_command
def inspect_cmd(url: Url, step: Step = None, as_json: AsJson = False, storage_options: StorageOptions = None) -> None:
    """Tensors (names, shapes, dtypes, which ranks hold what) and objects of a step. Metadata only."""
    contents = _open(url, storage_options).inspect(step)
    if as_json:
        print_json(contents.as_json())
        return
    print_contents(contents)


@app.command("verify")
@_command
def verify_cmd(
    url: Url,
    step: Step = None,
    all_steps: Annotated[bool, typer.Option("--all", help="verify every committed step")] = False,
    as_json: AsJson = False,
    threads: Annotated[int, typer.Option(help="files checked in parallel")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Sizes and checksums of every file against the manifest. Exit 0 intact, 1 damaged."""
    reader = _open(url, storage_options)
    if all_steps and step is not None:
        raise DistckptError("give --step N or --all, not both")
    steps = reader.catalog.committed_steps() if all_steps else [reader.resolve(step)]
    if not steps:
        reader.resolve(None)  # raises the "no committed checkpoint" error
    reports = []
    for s in steps:
        try:
            total = reader.catalog.read_manifest(s).nbytes
        except DistckptError:
            total = 0  # a damaged manifest: verify reports it below
        with progress(f"step {s}", quiet or as_json) as bar:
            task = bar.add_task("verify", total=total)
            advance = functools.partial(bar.advance, task)
            reports.append(reader.verify(s, progress=advance, threads=threads))
    if as_json:
        print_json({"url": reader.url, "ok": all(r.ok for r in reports), "steps": [r.as_json() for r in reports]})
    else:
        for r in reports:
            verdict = "OK" if r.ok else "DAMAGED"
            out.print(f"step {r.step}: {verdict} ({r.files} files, {human_bytes(r.nbytes)})", markup=False)
            for p in r.problems:
                out.print(f"  {p.name}: {p.problem}", markup=False)
            for name in r.unlisted:
                out.print(f"  {name}: not in the manifest (ignored)", markup=False)
    if not all(r.ok for r in reports):
        bad = [f"step {p.step} {p.name}" for r in reports for p in r.problems]
        print(f"error: {len(bad)} damaged file(s): {', '.join(bad[:10])}", file=sys.stderr)
        raise typer.Exit(1)


@app.command("gc")
@_command
def gc_cmd(
    url: Url,
    keep_last: KeepLastOpt = None,
    keep_best: KeepBestOpt = None,
    metric: MetricOpt = None,
    best_mode: BestModeOpt = "min",
    keep_every: KeepEveryOpt = None,
    keep_every_hours: KeepHoursOpt = None,
    keep_newer_than: NewerOpt = None,
    among: AmongOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="print what would go; delete nothing")] = False,
    force: Annotated[bool, typer.Option(help="remove leftovers even while a job holds the root")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Apply retention (never the newest step or a milestone) and remove stale uncommitted leftovers."""
    from ..layout.guarantees import honours_exclusive_create
    from ..retention import Keep
    from .gc import plan_gc, run_gc

    policy = build_policy(keep_last, keep_best, metric, best_mode, keep_every, keep_every_hours, keep_newer_than, among)
    reader = _open(url, storage_options)
    if not dry_run and not honours_exclusive_create(reader.storage, reader.root):
        out.print(f"note: {reader.url} ignores exclusive creates (If-None-Match); see README, Storage", markup=False)
    plan = plan_gc(reader, policy or Keep(), force=force)
    _require_checkpoints(reader, plan.keep + plan.delete, plan.leftovers + plan.spared)
    verb = "would delete" if dry_run else "deleting"
    if policy is None:
        out.print("no retention rule given (--keep-last/--keep-best/--keep-every/...): every step is kept")
    for info in plan.delete:
        out.print(
            f"{verb} step {info.step} ({human_bytes(info.nbytes)}, meta: {meta_text(info.meta) or '-'})", markup=False
        )
    for left in plan.leftovers:
        out.print(f"{verb} leftover {left.name} [{left.kind}]", markup=False)
    for left in plan.spared:
        out.print(f"leaving {left.name} [{left.kind}]", markup=False)
    if plan.spared:
        out.print(f"  ({plan.spared_reason})", markup=False)
    kept = ", ".join(str(c.step) for c in plan.keep) or "none"
    if dry_run:
        out.print(f"keeping steps: {kept} (dry run: nothing was deleted)", markup=False)
        return
    result = run_gc(reader, plan)
    out.print(f"kept steps: {kept}; deleted {len(result.deleted)} steps, {len(result.removed)} leftovers", markup=False)
    if not result.ok:
        for what, why in result.failed.items():
            print(f"error: could not remove {what}: {why}", file=sys.stderr)
        raise typer.Exit(1)


@app.command("export")
@_command
def export_cmd(
    url: Url,
    to: Annotated[str, typer.Option("--to", help="output file: *.safetensors (streamed) or *.pt")],
    step: Step = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="recoverable or prefix to keep, e.g. model (repeatable)")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="cast floating-point tensors: bf16, fp16 or fp32")
    ] = None,
    batch_mb: Annotated[float, typer.Option("--batch-mb", help="tensor data read per batch (MiB)")] = 1024,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Consolidate a (sharded) step into one file, e.g. --only model --dtype bf16 for deployment."""
    from .export import export, parse_dtype, select

    reader = _open(url, storage_options)
    resolved = reader.resolve(step)
    table = reader.tensor_table(resolved)
    names = select(list(table), only or [])
    cast = parse_dtype(dtype)
    total = sum(math.prod(table[n]["shape"]) * _size(table[n]["dtype"], cast) for n in names.values())
    with progress(f"export step {resolved}", quiet) as bar:
        task = bar.add_task("export", total=total)
        result = export(
            reader,
            to,
            step=resolved,
            only=only or None,
            dtype=cast,
            batch_bytes=max(1, int(batch_mb * (1 << 20))),
            progress=functools.partial(bar.advance, task),
        )
    out.print(
        f"wrote {result.path}: {result.tensors} tensors, {human_bytes(result.nbytes)} from step {result.step} "
        f"in {result.seconds:.2f} s ({human_bytes(result.nbytes / max(result.seconds, 1e-9))}/s)",
        markup=False,
    )


def _size(dtype: str, cast: Any) -> int:
    from ..tree import dtype_from_name

    d = dtype_from_name(dtype)
    return (cast if cast is not None and d.is_floating_point else d).itemsize


@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
@_command
def bench_cmd(ctx: typer.Context) -> None:
    """The save/restore benchmark (distckpt.bench) with small defaults; extra arguments pass through
    (--size-gb, --device, --repeats, --out, ...; `distckpt bench --help` for all)."""
    args = list(ctx.args)
    try:
        from ..bench import save as bench
    except ImportError as e:
        raise DistckptError(f"the benchmark is not available ({e}); install distckpt[bench]") from e
    if not any(a == "--device" or a.startswith("--device=") for a in args):
        import torch

        args += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    if not any(a == "--size-gb" or a.startswith("--size-gb=") for a in args):
        args += ["--size-gb", "0.5"]
    raise typer.Exit(bench.main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    try:
        app(args=argv, prog_name="distckpt")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
