"""Module paths of the flat 0.1 layout still import, warn once, and give the new module
(one copy of every class, so ``isinstance`` across old and new paths holds)."""

import importlib
import sys

import pytest

import distckpt
from distckpt._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_imports_the_new_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old]):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert module is new and module.__spec__.name == MOVED[old]


def test_documented_old_imports_keep_working():
    sys.modules.pop("distckpt.export", None)
    with pytest.warns(DeprecationWarning):
        from distckpt.export import export
    from distckpt.manifest import Manifest

    assert export is distckpt.tools.export.export
    assert Manifest is distckpt.layout.manifest.Manifest
    assert distckpt.transfer is distckpt.tools.transfer.transfer  # a public function, not a module
