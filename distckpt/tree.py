"""Split a state tree into a JSON skeleton plus a flat ``{fqn: tensor}`` dict, and back.

Tensors go to DCP under DCP's own flattened names (``"model.0.weight"``), so a plain
``dcp.load({"model": model.state_dict()}, checkpoint_id=step_dir)`` finds them. Every
other leaf (ints, floats, strings, tuples, dicts with int keys, numpy scalars, bytes)
is kept in the skeleton, which is plain JSON: nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

TENSOR = "__tensor__"
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__bytes__", "__np__", "__dtype__", "__inline__")
_SCALARS = (str, int, float, bool, type(None))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class _Splitter:
    def __init__(self, inline: bool) -> None:
        self.inline = inline
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, _SCALARS):
            return obj
        if isinstance(obj, dict):
            return self._dict(obj, path)
        if isinstance(obj, list):
            return [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):  # torch.Size included
            return {"__tuple__": [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": dtype_name(obj)}
        return self._other(obj, path)

    def _tensor(self, t: torch.Tensor, path: str, numpy: bool = False) -> dict[str, Any]:
        if self.inline:
            return inline_tensor(t, numpy)
        if path in self.tensors:
            raise ValueError(f"two tensors flatten to the same name {path!r}; rename one key")
        self.tensors[path] = t
        return {TENSOR: path, "numpy": True} if numpy else {TENSOR: path}

    def _dict(self, d: dict[Any, Any], path: str) -> Any:
        plain = all(isinstance(k, str) and k not in _TAGS for k in d)
        if plain:
            return {k: self.encode(v, f"{path}.{k}") for k, v in d.items()}
        items = []
        for k, v in d.items():
            if not isinstance(k, _SCALARS + (tuple,)):
                raise TypeError(f"cannot checkpoint dict key {k!r} of type {type(k).__name__} at {path!r}")
            items.append([self.encode(k, path), self.encode(v, f"{path}.{k}")])
        return {"__dict__": items}

    def _other(self, obj: Any, path: str) -> Any:
        np = optional_numpy()
        if np is not None and isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError(f"cannot checkpoint a numpy object array at {path!r}")
            return self._tensor(torch.from_numpy(obj.copy()), path, numpy=True)
        if np is not None and isinstance(obj, np.generic):
            return {"__np__": str(obj.dtype), "value": obj.item()}
        raise TypeError(
            f"cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__} at {path!r}: "
            "give it state_dict()/load_state_dict(), or call "
            "distckpt.register_hooks(cls, save=..., load=...)"
        )


def split(obj: Any, prefix: str, *, inline: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return ``(skeleton, tensors)``; with ``inline=True`` tensors are base64 inside the skeleton."""
    splitter = _Splitter(inline)
    skeleton = splitter.encode(obj, prefix)
    return skeleton, splitter.tensors


def tensor_refs(skeleton: Any) -> list[str]:
    """Every tensor name a skeleton refers to, in order."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if TENSOR in node and len(node) <= 2:
                out.append(node[TENSOR])
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(skeleton)
    return out


def join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the object a skeleton describes, taking tensors by name from ``tensors``."""
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if TENSOR in skeleton and len(skeleton) <= 2:
        t = tensors[skeleton[TENSOR]]
        return t.numpy() if skeleton.get("numpy") else t
    if "__tuple__" in skeleton:
        return tuple(join(v, tensors) for v in skeleton["__tuple__"])
    if "__dict__" in skeleton:
        return {_hashable(join(k, tensors)): join(v, tensors) for k, v in skeleton["__dict__"]}
    if "__bytes__" in skeleton:
        return base64.b64decode(skeleton["__bytes__"])
    if "__dtype__" in skeleton:
        return dtype_from_name(skeleton["__dtype__"])
    if "__np__" in skeleton:
        np = optional_numpy()
        return np.dtype(skeleton["__np__"]).type(skeleton["value"]) if np else skeleton["value"]
    if "__inline__" in skeleton:
        return _from_inline(skeleton)
    return {k: join(v, tensors) for k, v in skeleton.items()}


def inline_tensor(t: torch.Tensor, numpy: bool = False) -> dict[str, Any]:
    """A small tensor as JSON (base64 of its bytes); used for per-rank state such as RNGs."""
    cpu = t.detach().to("cpu").contiguous()
    raw = cpu.reshape(-1).view(torch.uint8).numpy().tobytes() if cpu.numel() else b""
    return {
        "__inline__": base64.b64encode(raw).decode(),
        "dtype": dtype_name(cpu.dtype),
        "shape": list(cpu.shape),
        "numpy": numpy,
    }


def _from_inline(node: dict[str, Any]) -> Any:
    dtype = dtype_from_name(node["dtype"])
    raw = bytearray(base64.b64decode(node["__inline__"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    t = flat.view(dtype).reshape(node["shape"]).clone()
    return t.numpy() if node.get("numpy") else t


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def optional_numpy() -> Any:
    try:
        import numpy

        return numpy
    except ImportError:  # pragma: no cover
        return None
