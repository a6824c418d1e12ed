"""``distckpt export``: a (sharded) checkpoint step consolidated into one file for deployment.

Tensors are read through DCP a bounded batch at a time (``CheckpointReader.read_tensors``),
so resharding from any number of ranks works and the peak memory is about one batch plus
what the output format needs:

* ``.safetensors`` is written here, streaming: the header (names, dtypes, shapes, byte
  offsets) is known from the metadata before any tensor is read, so every tensor is written
  as soon as its batch arrives and then dropped. Peak: one batch (default 1 GiB).
* ``.pt`` / ``.pth`` is ``torch.save`` of a flat ``{name: tensor}`` dict, which needs every
  exported tensor in memory once (load it with ``torch.load(path, weights_only=True)``).

The file appears atomically: it is written under a temporary name in the same directory
and renamed into place, so a failed export never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ..errors import DistckptError
from ..storage import is_local_url, local_path
from ..tree import dtype_from_name
from .reader import CheckpointReader

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format")
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class ExportResult:
    path: str
    step: int
    source: str
    tensors: int
    nbytes: int  # tensor bytes written (after any cast)
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a floating ``torch.dtype``) -> dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"--dtype must be a floating-point dtype, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; use one of bf16, fp16, fp32")
    return DTYPES[key]


def select(names: Sequence[str], only: Sequence[str]) -> dict[str, str]:
    """``{output name: checkpoint name}`` for the tensors under the ``only`` prefixes.

    With exactly one prefix the prefix is dropped (``model.0.weight`` -> ``0.weight``), so the
    file loads straight into the module with ``load_state_dict``.
    """
    prefixes = [p.rstrip(".") for p in only if p.rstrip(".")]
    if not prefixes:
        return {n: n for n in names}
    out: dict[str, str] = {}
    for n in names:
        for p in prefixes:
            if n == p or n.startswith(p + "."):
                out[n[len(p) + 1 :] if len(prefixes) == 1 and n != p else n] = n
                break
    if not out:
        roots = sorted({n.split(".", 1)[0] for n in names})
        raise DistckptError(
            f"--only {' '.join(prefixes)} matches no tensor in this checkpoint; its tensors are under: "
            f"{', '.join(roots) or 'nothing'}"
        )
    return out


def export(
    source: str | CheckpointReader,
    to: str,
    *,
    step: int | None = None,
    only: str | Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_bytes: int = 1 << 30,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the tensors of a committed step (default: newest) into one local file.

    ``only``: recoverable(s) or name prefixes to keep (``"model"`` for weights only; with one
    prefix it is dropped from the names). ``dtype``: cast floating-point tensors (``"bf16"``,
    ``"fp16"``, ``"fp32"``); integer and bool tensors are written as they are.
    ``progress(nbytes)`` is called as tensors are written.
    """
    t0 = time.perf_counter()
    out_path = _check_destination(to)
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source, storage_options)
    step = reader.resolve(step)
    table = reader.tensor_table(step)
    if not table:
        raise DistckptError(f"step {step} of {reader.url} holds no tensors; nothing to export")
    names = select(list(table), [only] if isinstance(only, str) else list(only or ()))
    cast = parse_dtype(dtype)
    specs = {out: _out_spec(table[src], cast) for out, src in names.items()}
    by_source = {src: out for out, src in names.items()}
    meta = {"format": "pt", "distckpt.step": str(step), "distckpt.source": reader.step_url(step)}
    written = 0
    with _atomic_file(out_path) as f:
        writer = SafetensorsWriter(f, specs, meta) if out_path.endswith(".safetensors") else _PtWriter(f)
        for batch in reader.read_tensors(list(names.values()), step, batch_bytes=batch_bytes):
            for src in list(batch):
                t = batch.pop(src)  # dropped as soon as it is written (safetensors)
                if cast is not None and t.is_floating_point():
                    t = t.to(cast)
                writer.write(by_source[src], t)
                written += t.numel() * t.element_size()
                if progress is not None:
                    progress(t.numel() * t.element_size())
        writer.close()
    return ExportResult(out_path, step, reader.step_url(step), len(names), written, time.perf_counter() - t0)


@contextlib.contextmanager
def _atomic_file(path: str) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` complete (fsynced, renamed) or not at all."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _PtWriter:
    """``torch.save`` of a flat ``{name: tensor}`` dict: it needs every tensor at once."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor

    def close(self) -> None:
        torch.save(self.tensors, self.f)
        self.tensors = {}


def _check_destination(to: str) -> str:
    to = os.fspath(to)
    if not is_local_url(to):
        raise DistckptError(f"export writes a local file, got {to!r}; export locally, then upload the file")
    path = local_path(to)
    if not path.endswith(SUFFIXES):
        raise DistckptError(f"cannot tell the format of {to!r}; name it *.safetensors or *.pt")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"directory {parent} does not exist; create it first")
    return path


def _out_spec(spec: dict[str, Any], cast: torch.dtype | None) -> tuple[tuple[int, ...], torch.dtype]:
    dtype = dtype_from_name(spec["dtype"])
    if cast is not None and dtype.is_floating_point:
        dtype = cast
    return tuple(int(d) for d in spec["shape"]), dtype


def _check_safetensors_dtypes(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    for name, (_, dtype) in specs.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise DistckptError(
                f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; export to .pt, "
                "or pick --only / --dtype so that it is left out or cast"
            )


class SafetensorsWriter:
    """Writes the safetensors format in one pass: 8-byte little-endian header length, a JSON
    header (``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__``), padded with
    spaces to a multiple of 8, then every tensor's raw little-endian bytes in header order.

    ``write`` must be called once per tensor, in the order of ``specs``.
    """

    def __init__(
        self, f: BinaryIO, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - torch's raw bytes would be big-endian
            raise DistckptError("safetensors export needs a little-endian machine")
        _check_safetensors_dtypes(specs)  # before any tensor is read
        self.f = f
        header: dict[str, Any] = {"__metadata__": metadata}
        self.order: list[tuple[str, int]] = []
        offset = 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # aligns the data section, as the reference writer does
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self.total = offset
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, nbytes = self.order[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors writer got {name!r}, expected {expected!r} next")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise RuntimeError(f"{name!r}: {data.nbytes} bytes, the header says {nbytes}")
        self.f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"safetensors file is incomplete: {self._next} of {len(self.order)} tensors written")
