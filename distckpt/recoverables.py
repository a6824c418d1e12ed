"""Recoverables: what a Checkpointer saves and restores, each behind a small adapter.

* ``nn.Module`` - through ``torch.distributed.checkpoint.state_dict`` (strips DDP's
  ``module.`` prefix, shards or gathers FSDP2/DTensor parameters as the engine needs);
* ``torch.optim.Optimizer`` - keyed by parameter names when its model is also a
  recoverable, so its state reshards and survives reordering;
* anything with ``state_dict()``/``load_state_dict()`` (DCP's ``Stateful``): schedulers,
  grad scalers, samplers, user objects;
* a ``torch.Tensor`` (restored in place), a ``dict`` (contents replaced in place), or a
  plain JSON value (read it back from ``ckpt.recoverables[name]``);
* any other type once ``register_hooks(cls, save=, load=)`` says how.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .arena import aligned, local_part
from .errors import IncompatibleCheckpointError
from .tree import split

_HOOKS: dict[type, tuple[Callable[[Any], Any], Callable[[Any, Any], None]]] = {}


def register_hooks(cls: type, *, save: Callable[[Any], Any], load: Callable[[Any, Any], None]) -> None:
    """Teach distckpt a type: ``save(obj) -> state`` and ``load(obj, state)``.

    ``state`` may hold tensors, numpy arrays and JSON values, nested in dicts and lists.
    """
    if not isinstance(cls, type) or not callable(save) or not callable(load):
        raise TypeError("register_hooks(cls, save=callable, load=callable)")
    _HOOKS[cls] = (save, load)


_SAVER, _LOADER = "_distckpt_saver", "_distckpt_loader"
_RESTORING: ContextVar[Mapping[str, Any] | None] = ContextVar("distckpt_restoring_meta", default=None)


def mark_as_saver(method: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Mark ``method(self) -> state`` as the class's save hook (with ``register_checkpoint_hooks``)."""
    setattr(method, _SAVER, True)
    return method


def mark_as_loader(method: Callable[..., None]) -> Callable[..., None]:
    """Mark ``method(self, state)`` - or ``method(self, state, end_of_epoch)`` - as the class's
    load hook (with ``register_checkpoint_hooks``); ``end_of_epoch`` is what the restored
    step was saved with (``save(..., end_of_epoch=True)``)."""
    setattr(method, _LOADER, True)
    return method


def register_checkpoint_hooks(cls: type) -> type:
    """Class decorator (SpeechBrain's): registers the methods marked ``mark_as_saver`` and
    ``mark_as_loader`` as the hooks of ``cls`` and its subclasses (``register_hooks``)."""
    marked = {name: getattr(cls, name) for name in dir(cls) if callable(getattr(cls, name, None))}
    savers = [m for m in marked.values() if getattr(m, _SAVER, False)]
    loaders = [m for m in marked.values() if getattr(m, _LOADER, False)]
    if len(savers) != 1 or len(loaders) != 1:
        raise TypeError(f"{cls.__qualname__} needs exactly one @mark_as_saver and one @mark_as_loader method")
    saver, loader = savers[0], loaders[0]
    wants_epoch = len(inspect.signature(loader).parameters) >= 3

    def load(obj: Any, state: Any) -> None:
        if wants_epoch:
            loader(obj, state, bool((_RESTORING.get() or {}).get("end_of_epoch", False)))
        else:
            loader(obj, state)

    register_hooks(cls, save=saver, load=load)
    return cls


@contextlib.contextmanager
def restoring(meta: Mapping[str, Any]) -> Iterator[None]:
    """(restore) Load hooks run inside this: ``end_of_epoch`` comes from the step's ``meta``."""
    token = _RESTORING.set(meta)
    try:
        yield
    finally:
        _RESTORING.reset(token)


@dataclass
class Adapter:
    """One recoverable. ``full`` asks for an unsharded (gathered) state, as chief mode does.

    ``state(full)``: what to save. ``target(full, saved)``: a state of the right structure
    whose tensors restore fills in place. ``load(state, full, strict)``: apply a restored state.
    """

    obj: Any
    per_rank: bool = False

    def state(self, full: bool) -> Any:
        return self.obj.state_dict()

    def target(self, full: bool, saved: Any) -> Any:
        return self.state(full)

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        self.obj.load_state_dict(state)

    @property
    def value(self) -> Any:
        return self.obj

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this recoverable holds now (cheap: no copies, no collectives)."""
        try:
            return list(split(self.state(False), "x")[1].values())
        except Exception:  # noqa: BLE001 - an estimate only; the real state is taken at save
            return []

    def estimate_bytes(self, full: bool) -> int:
        """Bytes this recoverable will stage (global tensors when ``full``, else local shards)."""
        return sum(_nbytes(t, full) for t in self.tensors())

    def on_cuda(self) -> bool:
        return any(local_part(t).is_cuda for t in self.tensors())


def _options(full: bool, offload: bool = False, strict: bool = True) -> StateDictOptions:
    # Saving a full state offloads to CPU on the chief (other ranks get nothing: they do not
    # write). Restore targets stay on the device on every rank, since every rank loads.
    return StateDictOptions(full_state_dict=full, cpu_offload=full and offload, strict=strict)


class ModuleAdapter(Adapter):
    def tensors(self) -> list[torch.Tensor]:
        return list(self.obj.state_dict().values())

    def state(self, full: bool) -> Any:
        return get_model_state_dict(self.obj, options=_options(full, offload=True))

    def target(self, full: bool, saved: Any) -> Any:
        return get_model_state_dict(self.obj, options=_options(full))

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        set_model_state_dict(self.obj, state, options=_options(full, strict=strict))


class OptimizerAdapter(Adapter):
    """Optimizer state keyed by parameter FQNs when its model is known."""

    model: nn.Module | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [v for s in self.obj.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def estimate_bytes(self, full: bool) -> int:
        if self.obj.state:
            return super().estimate_bytes(full)
        return _dry_run_state_bytes(self.obj, full)

    def on_cuda(self) -> bool:
        return any(local_part(p).is_cuda for g in self.obj.param_groups for p in g["params"])

    def state(self, full: bool) -> Any:
        if self.model is None or not self.obj.state:
            # A never-stepped optimizer has no tensors; keep it that way (DCP's helper
            # would take a zero-lr step to create them, shifting Adam's step count).
            return self.obj.state_dict()
        return get_optimizer_state_dict(self.model, self.obj, options=_options(full, offload=True))

    def target(self, full: bool, saved: Any) -> Any:
        if self.model is None or _empty_optimizer_state(saved):
            return self.obj.state_dict()
        return get_optimizer_state_dict(self.model, self.obj, options=_options(full))

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        if self.model is None or _empty_optimizer_state(state):
            self.obj.load_state_dict(state)
        else:
            set_optimizer_state_dict(self.model, self.obj, state, options=_options(full, strict=strict))


class TensorAdapter(Adapter):
    def state(self, full: bool) -> Any:
        return self.obj

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        if state is not self.obj:
            if state.shape != self.obj.shape:
                raise IncompatibleCheckpointError(
                    f"tensor shape {tuple(state.shape)} in checkpoint, {tuple(self.obj.shape)} here"
                )
            with torch.no_grad():
                self.obj.copy_(state)


class DictAdapter(Adapter):
    def state(self, full: bool) -> Any:
        return self.obj

    def target(self, full: bool, saved: Any) -> Any:
        return self.obj  # its tensors are filled in place (on their device); new ones are made

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        self.obj.clear()
        self.obj.update(state)


class ValueAdapter(Adapter):
    """A plain JSON value (int, float, str, list, ...): it is replaced on restore."""

    def state(self, full: bool) -> Any:
        return self.obj

    def target(self, full: bool, saved: Any) -> Any:
        return None

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        self.obj = state


class HookAdapter(Adapter):
    def __init__(self, obj: Any, hooks: tuple[Callable[[Any], Any], Callable[[Any, Any], None]]) -> None:
        super().__init__(obj)
        self.hooks = hooks

    def state(self, full: bool) -> Any:
        return self.hooks[0](self.obj)

    def load(self, state: Any, full: bool, strict: bool = True) -> None:
        self.hooks[1](self.obj, state)


_VALUE_TYPES = (int, float, str, bool, type(None), list, tuple)


def make_adapter(obj: Any, hooks: dict[type, Any] | None = None) -> Adapter:
    """Choose how to checkpoint ``obj``; a clear TypeError when there is no way."""
    for table in (hooks or {}, _HOOKS):
        for cls in type(obj).__mro__:
            if cls in table:
                return HookAdapter(obj, table[cls])
    if isinstance(obj, nn.Module):
        return ModuleAdapter(obj)
    if isinstance(obj, torch.optim.Optimizer):
        return OptimizerAdapter(obj)
    if isinstance(obj, torch.Tensor):
        return TensorAdapter(obj)
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return Adapter(obj, per_rank=bool(getattr(obj, "distckpt_per_rank", False)))
    if isinstance(obj, dict):
        return DictAdapter(obj)
    if isinstance(obj, _VALUE_TYPES):
        return ValueAdapter(obj)
    raise TypeError(
        f"cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__}: give it "
        "state_dict()/load_state_dict(), or call distckpt.register_hooks(cls, save=..., load=...)"
    )


class Recoverables:
    """A Checkpointer's recoverables by name, each behind its adapter; hooks registered on
    the Checkpointer (``register_hooks``) take precedence over global ones."""

    def __init__(self) -> None:
        self.adapters: dict[str, Adapter] = {}
        self.hooks: dict[type, Any] = {}

    def add(self, name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ValueError(f"recoverable names must be non-empty strings without '.' or '/', got {name!r}")
        self.adapters[name] = make_adapter(obj, self.hooks)
        link_optimizers(self.adapters)

    def register_hooks(self, cls: type, save: Callable[[Any], Any], load: Callable[[Any, Any], None]) -> None:
        self.hooks[cls] = (save, load)
        for name, adapter in list(self.adapters.items()):
            if isinstance(adapter.value, cls):
                self.add(name, adapter.value)

    def values(self) -> dict[str, Any]:
        return {n: a.value for n, a in self.adapters.items()}

    def snapshot(self, full: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """(training thread, in save()) ``(skeletons, per-rank states, tensors)``: JSON
        skeletons of the shared recoverables, per-rank states with their tensors inline,
        and every shared tensor by its flattened name."""
        skeletons, per_rank, tensors = {}, {}, {}
        for name, adapter in self.adapters.items():
            state = adapter.state(full)
            if adapter.per_rank:
                per_rank[name] = split(state, name, inline=True)[0]
                continue
            skeletons[name], found = split(state, name)
            tensors.update(found)  # names start with the recoverable's own (dot-free) name: no clash
        return skeletons, per_rank, tensors

    def estimate_bytes(self, full: bool) -> int:
        """Staging bytes the next save will need (per-rank states are inline JSON)."""
        return sum(a.estimate_bytes(full) for a in self.adapters.values() if not a.per_rank)

    def on_cuda(self) -> bool:
        return any(a.on_cuda() for a in self.adapters.values())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers among the recoverables (``snapshot="overlap"`` holds their steps)."""
        return [a.obj for a in self.adapters.values() if isinstance(a, OptimizerAdapter)]


def link_optimizers(adapters: dict[str, Adapter]) -> None:
    """Tell each optimizer which recoverable module owns its parameters (FQN keys)."""
    modules = [a.obj for a in adapters.values() if isinstance(a, ModuleAdapter)]
    for a in adapters.values():
        if isinstance(a, OptimizerAdapter):
            params = {id(p) for g in a.obj.param_groups for p in g["params"]}
            owners = [m for m in modules if params <= {id(p) for p in m.parameters()}]
            a.model = owners[0] if len(owners) == 1 else None


def _nbytes(t: torch.Tensor, full: bool) -> int:
    """Bytes ``t`` takes in a staging pool (each slice is aligned)."""
    return aligned((t.numel() if full else local_part(t).numel()) * t.dtype.itemsize)


def _dry_run_state_bytes(optim: torch.optim.Optimizer, full: bool) -> int:
    """Size of the state a never-stepped optimizer will create, found by stepping a copy of
    it over meta tensors (no memory, no change to the real optimizer)."""
    groups = []
    for group in optim.param_groups:
        params = []
        for p in group["params"]:
            shape = p.shape if full else local_part(p).shape
            meta = nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
            meta.grad = torch.empty_like(meta)
            params.append(meta)
        groups.append({**group, "params": params, "foreach": False, "fused": False})
    try:
        ghost = type(optim)(groups)
        ghost.step()
    except Exception:  # noqa: BLE001 - unknown optimizer: the pool grows at the first save
        return 0
    return sum(_nbytes(v, True) for s in ghost.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _empty_optimizer_state(state: Any) -> bool:
    return isinstance(state, dict) and not state.get("state")
