"""Suite-wide hygiene for one long pytest process.

Every jitted shape the suite compiles keeps its XLA CPU executable, and each executable holds memory
mappings; a full run reached the kernel's limit of 65530 mappings per process (`vm.max_map_count`) near
its end and XLA then crashed inside a compile (SIGSEGV). Dropping jax's caches after each test module
frees those executables, so the count stays that of the largest module.
"""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_executables_after_each_module():
    yield
    jax.clear_caches()
    gc.collect()
