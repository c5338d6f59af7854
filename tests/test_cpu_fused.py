"""When the CPU runs the fused host pass (``pallas_kernels/cpu_fused.py``): by default on a one-device CPU
where numba imports and scipy's BLAS runs one thread, which importing tmjax arranges when scipy is not
loaded yet; otherwise the XLA passes. Each case in a fresh interpreter, since BLAS reads its thread count
once, when it loads. (The kernel's numbers: ``tests/test_attention.py``, both ways against dense.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="the fused CPU pass needs the cpu extra (numba)")

PROBE = """
import json, sys
{before}
import jax, tmjax
from threadpoolctl import threadpool_info
from tmjax.pallas_kernels import cpu_fused, tuning, xla
chosen = tuning.choose(xla, "xla", q_heads=9, kv_heads=3, head_dim=64, pattern="causal")
blas = {{lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}}
print(json.dumps(dict(fused=chosen.fused, available=cpu_fused.available(), runs=xla.fused_here(chosen), blas=blas)))
"""


def probe(before: str = "", **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    environ.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env})
    done = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def scipys(blas: dict) -> dict:
    return {path: n for path, n in blas.items() if "scipy.libs" in path or "scipy_openblas32" in path}


def test_default_on_one_cpu_device_loads_scipys_blas_single_threaded():
    got = probe()
    assert got["fused"] and got["available"] and got["runs"]
    assert scipys(got["blas"]) and set(scipys(got["blas"]).values()) == {1}


def test_scipy_loaded_first_with_threads_means_the_xla_passes():
    got = probe("import scipy.linalg", OPENBLAS_NUM_THREADS="2")
    assert got["fused"]  # the table still asks for it ...
    assert not got["available"] and not got["runs"]  # ... but it would serialise its jobs: XLA runs
    assert set(scipys(got["blas"]).values()) == {2}


def test_the_users_single_thread_setting_is_kept():
    got = probe("import scipy.linalg", OPENBLAS_NUM_THREADS="1")
    assert got["available"] and got["runs"]


def test_several_cpu_devices_run_the_xla_passes():
    got = probe(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert got["fused"] and got["available"] and not got["runs"]
