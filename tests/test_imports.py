"""Every module of the package imports: each ``.py`` file of the four source folders, listed from the
repository (not from the package's own idea of itself), under the install's ``tmjax`` names. Under the
newest jax (scripts/test-newest-jax.sh) this is what reaches the modules no other test there loads."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"tmjax": "tmjax", "models": "tmjax.models", "convert": "tmjax.convert",
           "pallas_kernels": "tmjax.pallas_kernels"}  # as pyproject.toml's package-dir maps them
MODULES = sorted(f"{package}.{path.stem}" for folder, package in FOLDERS.items()
                 for path in (ROOT / folder).glob("*.py") if path.stem not in ("__init__", "__main__"))


def test_the_module_list_is_the_source_tree():
    assert len(MODULES) >= 35 and "tmjax.pallas_kernels.guards" in MODULES and "tmjax.convert.gguf_source" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent.name in FOLDERS
