"""Deprecation aliases: module paths of the flat 0.1 layout keep importing, with a warning.

``import distckpt.manifest`` (or ``from distckpt.export import export``) resolves to the
module's new home (``distckpt.layout.manifest``, ``distckpt.tools.export``) through a
finder at the end of ``sys.meta_path``; the module object is the new one, so there is one
copy of each class. Public names are unaffected: they stay importable from ``distckpt``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = {
    "distckpt.bench_methods": "distckpt.bench.methods",
    "distckpt.bench_storage": "distckpt.bench.storage",
    "distckpt.catalog": "distckpt.layout.catalog",
    "distckpt.cleanup": "distckpt.tools.gc",
    "distckpt.cli": "distckpt.tools.cli",
    "distckpt.commit": "distckpt.layout.commit",
    "distckpt.contents": "distckpt.tools.inspection",
    "distckpt.dcp_io": "distckpt.dcp.safe",
    "distckpt.dist": "distckpt.ranks",
    "distckpt.export": "distckpt.tools.export",
    "distckpt.fsspec_storage": "distckpt.storage.fsspec",
    "distckpt.helpers": "distckpt.resumable",
    "distckpt.info": "distckpt.layout.catalog",
    "distckpt.inspection": "distckpt.tools.reader",
    "distckpt.lease": "distckpt.layout.lease",
    "distckpt.manifest": "distckpt.layout.manifest",
    "distckpt.reader": "distckpt.dcp.shared_reader",
    "distckpt.restoring": "distckpt.restore",
    "distckpt.saving": "distckpt.save",
    "distckpt.tiers": "distckpt.upload",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} is now {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[module.__name__] = module.__spec__  # the import system replaces it; put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._specs.get(module.__name__, module.__spec__)


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
