"""``distckpt.transfer``: load matching parameters into a module of a possibly different architecture.

For fine-tuning and model surgery (SpeechBrain's "parameter transfer"): names that exist in
both the source and the module with the same shape are loaded; everything else is reported
(missing, unexpected, shape-mismatched) and, with ``strict=True``, raised before the module
is touched. Sources:

* a distckpt root URL (its newest committed step) or a step URL, on any storage backend:
  only the matching tensors are read, through DCP, a bounded batch at a time;
* a ``.safetensors`` file (an ``distckpt export`` or any other): matching tensors only;
* a torch file (``.pt``, ``.pth``, ``.bin``, ...): always ``torch.load(weights_only=True)``,
  so a file cannot run code; nested dicts are flattened with dots;
* a mapping of names to tensors (a state dict already in memory).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ..errors import DistckptError, IncompatibleCheckpointError
from ..storage import is_local_url, local_path
from ..tree import dtype_from_name
from .reader import CheckpointReader

Spec = tuple[tuple[int, ...], torch.dtype]
Rename = Callable[[str], str | None] | Mapping[str, str] | None
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


@dataclass(frozen=True)
class TransferReport:
    """What ``transfer`` did. Names are the module's (after ``only`` and ``rename``)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the module, not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the module
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # (source, module)
    cast: list[str] = field(default_factory=list)  # loaded with a dtype conversion
    only: str = ""

    @property
    def ok(self) -> bool:
        """True when every name matched in both directions with the same shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        head = (
            f"transfer from {self.source}{f' (only {self.only!r})' if self.only else ''}: "
            f"{len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched"
        )
        lines = [head]
        if self.missing:
            lines.append(f"  missing (in the module, not in the source): {_some(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (in the source, not in the module): {_some(self.unexpected)}")
        for name, (src, own) in list(self.mismatched.items())[:10]:
            lines.append(f"  shape mismatch {name}: source {list(src)}, module {list(own)}")
        if len(self.mismatched) > 10:
            lines.append(f"  ... and {len(self.mismatched) - 10} more shape mismatches")
        return "\n".join(lines)


def transfer(
    module: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = False,
    rename: Rename = None,
    only: str | None = None,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_bytes: int = 1 << 30,
) -> TransferReport:
    """Load the parameters and buffers of ``source`` whose names and shapes match ``module``.

    ``only``: the recoverable or name prefix to take from the source, dropped from the names
    (default: ``"model"`` when the source has tensors under ``model.`` that fit the module
    better that way, else the names as they are; ``""`` for no prefix). ``rename``: a
    callable ``name -> new name or None`` (None drops it), or a dict of name-prefix
    replacements such as ``{"encoder": "backbone"}``, applied after ``only``.
    A ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix is dropped on both sides.
    ``strict=True`` raises ``IncompatibleCheckpointError`` (with ``.report``) before touching
    the module unless everything matches. Returns a ``TransferReport``.
    """
    target = _unwrap(module)
    own = target.state_dict()
    _refuse_dtensors(own)
    src = _open_source(source, step, storage_options)
    specs = src.specs()
    if only is None:
        only = _default_only(specs, own, rename)
    mapping = _map_names(specs, only, rename)  # module name -> source name
    report = _compare(src.label, own, specs, mapping, only)
    if strict and not report.ok:
        err = IncompatibleCheckpointError(f"{report}\npass strict=False to load what matches")
        err.report = report  # type: ignore[attr-defined]
        raise err
    by_source = {mapping[n]: n for n in report.loaded}
    for batch in src.load([mapping[n] for n in report.loaded], batch_bytes):
        result = target.load_state_dict({by_source[k]: v for k, v in batch.items()}, strict=False)
        if result.unexpected_keys:  # cannot happen: names were matched against state_dict()
            raise DistckptError(f"the module refused {result.unexpected_keys[:5]} while loading")
        batch.clear()
    return report


# --- sources -------------------------------------------------------------------------------


class _Source:
    label = ""

    def specs(self) -> dict[str, Spec]:
        raise NotImplementedError

    def load(self, names: list[str], batch_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError


class _CheckpointSource(_Source):
    def __init__(self, reader: CheckpointReader, step: int | None) -> None:
        self.reader, self.step = reader, reader.resolve(step)
        self.label = reader.step_url(self.step)

    def specs(self) -> dict[str, Spec]:
        table = self.reader.tensor_table(self.step)
        return {n: (tuple(s["shape"]), dtype_from_name(s["dtype"])) for n, s in table.items()}

    def load(self, names: list[str], batch_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        if names:
            yield from self.reader.read_tensors(names, self.step, batch_bytes=batch_bytes)


class _SafetensorsSource(_Source):
    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.label, self._open = path, lambda: safe_open(path, framework="pt", device="cpu")

    def specs(self) -> dict[str, Spec]:
        from .export import SAFETENSORS_DTYPES

        codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        out = {}
        with self._open() as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), codes.get(sl.get_dtype(), torch.uint8))
        return out

    def load(self, names: list[str], batch_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        with self._open() as f:
            batch: dict[str, torch.Tensor] = {}
            size = 0
            for name in names:
                t = f.get_tensor(name)
                batch[name] = t
                size += t.numel() * t.element_size()
                if size >= batch_bytes:
                    yield batch
                    batch, size = {}, 0
            if batch:
                yield batch


class _MappingSource(_Source):
    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str) -> None:
        self.tensors, self.label = dict(tensors), label

    def specs(self) -> dict[str, Spec]:
        return {n: (tuple(t.shape), t.dtype) for n, t in self.tensors.items()}

    def load(self, names: list[str], batch_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
        yield {n: self.tensors[n] for n in names}


def _open_source(source: Any, step: int | None, storage_options: dict[str, Any] | None) -> _Source:
    if isinstance(source, Mapping):
        return _MappingSource(_flatten(source), "a state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"transfer source must be a URL, a path or a state dict, got {type(source).__name__}")
    url = os.fspath(source)
    local = is_local_url(url)
    path = local_path(url)
    if local and os.path.isfile(path):
        if path.endswith(".safetensors"):
            return _SafetensorsSource(path)
        return _MappingSource(_flatten(_torch_load(path)), path)
    if not local and url.rstrip("/").endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise DistckptError(f"transfer reads exported files from local disk; download {url} first")
    if local and not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; give a checkpoint root, a step directory or a file")
    return _CheckpointSource(CheckpointReader(url, storage_options), step)


def _torch_load(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``, always: a model file must not run code."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistckptError(
            f"{path} is not a plain file of tensors (torch.load with weights_only=True refused it: {first}); "
            "distckpt never unpickles arbitrary objects; re-save it as a state dict of tensors"
        ) from e


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> ``{"a.b.c": tensor}``; non-tensor leaves are ignored."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
    return out


# --- matching ------------------------------------------------------------------------------


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers, whose names users mean."""
    while True:
        inner = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _refuse_dtensors(own: Mapping[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(t, DTensor) for t in own.values()):
        raise DistckptError(
            "transfer loads into plain (or DDP-wrapped) modules; this one holds DTensors (FSDP2/TP). "
            "Transfer before fully_shard(), or restore the checkpoint with a Checkpointer"
        )


def _strip_wrappers(names: list[str]) -> dict[str, str]:
    """``{name without a DDP/compile prefix: name}`` when every name carries that prefix."""
    out: OrderedDict[str, str] = OrderedDict((n, n) for n in names)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            consume_prefix_in_state_dict_if_present(out, prefix)  # type: ignore[arg-type]
    return dict(out)


def _apply_rename(name: str, rename: Rename) -> str | None:
    if rename is None:
        return name
    if callable(rename):
        return rename(name)
    for old in sorted(rename, key=len, reverse=True):  # the most specific prefix wins
        stem = old.rstrip(".")
        if name == stem or name.startswith(stem + ".") or not stem:
            new = rename[old].rstrip(".")
            rest = name[len(stem) :].lstrip(".") if stem else name
            return f"{new}.{rest}" if new and rest else (new or rest)
    return name


def _map_names(specs: Mapping[str, Spec], only: str, rename: Rename) -> dict[str, str]:
    """``{module name: source name}`` after ``only``, wrapper prefixes and ``rename``."""
    stem = only.rstrip(".")
    chosen = [n for n in specs if not stem or n.startswith(stem + ".")]
    if stem and not chosen:
        roots = sorted({n.split(".", 1)[0] for n in specs})
        raise DistckptError(f"only={only!r} matches nothing in the source; its names start with {roots[:10]}")
    plain = {n[len(stem) + 1 :] if stem else n: n for n in chosen}
    mapping: dict[str, str] = {}
    for short, original in _strip_wrappers(list(plain)).items():
        new = _apply_rename(short, rename)
        if new is None:
            continue
        if new in mapping:
            raise ValueError(f"rename maps both {mapping[new]!r} and {plain[original]!r} to {new!r}")
        mapping[new] = plain[original]
    return mapping


def _default_only(specs: Mapping[str, Spec], own: Mapping[str, torch.Tensor], rename: Rename) -> str:
    """``"model"`` if the source has a ``model.`` section that fits the module at least as well."""
    if not any(n.startswith("model.") for n in specs):
        return ""
    hits = {o: len(_map_names(specs, o, rename).keys() & own.keys()) for o in ("model", "")}
    return "model" if hits["model"] >= hits[""] else ""


def _compare(
    label: str, own: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], mapping: Mapping[str, str], only: str
) -> TransferReport:
    loaded, mismatched, cast = [], {}, []
    for name in own:  # the module's order: reports read like its state_dict
        src = mapping.get(name)
        if src is None:
            continue
        shape, dtype = specs[src]
        if tuple(own[name].shape) != tuple(shape):
            mismatched[name] = (tuple(shape), tuple(own[name].shape))
            continue
        loaded.append(name)
        if own[name].dtype != dtype:
            cast.append(name)
    return TransferReport(
        source=label,
        loaded=loaded,
        missing=[n for n in own if n not in mapping],
        unexpected=[n for n in mapping if n not in own],
        mismatched=mismatched,
        cast=cast,
        only=only,
    )


def _some(names: list[str], n: int = 10) -> str:
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
