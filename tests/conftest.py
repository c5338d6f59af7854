"""Suite-wide hygiene for one long pytest process.

Every jitted shape the suite compiles keeps its XLA CPU executable, and each executable holds memory
mappings; a full run reached the kernel's limit of 65530 mappings per process (`vm.max_map_count`) near
its end and XLA then crashed inside a compile (SIGSEGV). Dropping jax's caches after each test module
frees those executables, so the count stays that of the largest module.

tmjax is imported here, before any test module can import scipy (transformers does), so that scipy's
BLAS loads single-threaded and the CPU's fused attention pass (``pallas_kernels/cpu_fused.py``) is on for
the whole run, whichever tests are selected, as it is for a user who imports tmjax first.
"""

from __future__ import annotations

import gc

import jax
import pytest

import tmjax  # noqa: F401  (first: see the module docstring)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_executables_after_each_module():
    yield
    jax.clear_caches()
    gc.collect()
