"""The xla backend's causal and band passes on the CPU as one fused kernel (numba): the CPU's default.

Why: XLA:CPU runs a blocked attention's max, exp, sum and both products as separate fusions over the
score tile, so on a small CPU the passes are memory-bound and the causal pass ran 1.3-2x PyTorch SDPA's
time (``bench/NOTES.md``, "CPU causal pass"). This kernel keeps one small tile of scores in cache
across all of them: for each (batch row, KV head, query block) job, the G query heads of the group are
stacked as ``G * block_q`` rows, every key block a row can see (the sinks' blocks, then its window's up
to the diagonal; dense causal: all) is scored with BLAS (``np.dot``), masked per row to its sinks and
window, folded into an online softmax in place (``exp2`` by a polynomial that vectorises) and
multiplied into the accumulator with BLAS. Jobs run in parallel, query block ``c`` paired with
``n - 1 - c`` so every thread gets the same causal work (``bench/results/cpu-fused-attention-prototype/``:
0.88x PyTorch SDPA's time through ``jax.pure_callback`` where the XLA pass took 1.26x).

Reached through ``jax.pure_callback`` from ``xla`` on a one-device CPU host, the default there (``xla``'s
tuning table) where numba imports (the ``cpu`` extra) and scipy's BLAS runs one thread. That BLAS
(``np.dot`` in numba calls scipy's OpenBLAS) serialises the parallel jobs when it was loaded with more
than one thread, even when limited to one at run time (281 ms a layer against 117 loaded with one
thread, and the XLA pass's 204; ``bench/NOTES.md``): so importing this module loads scipy's BLAS with
``OPENBLAS_NUM_THREADS=1`` when scipy's BLAS is not loaded yet and the variable is unset (numpy's own
BLAS, loaded before, keeps its threads; scipy's linear algebra then runs on one thread in this process),
and where scipy came first with more threads the XLA pass runs instead (``available``). Several CPU
devices calling back at once hung numba's OpenMP threads (so ``xla`` uses it only with one CPU device).
Inputs come through ``guards.guard_values`` like every xla step, so only visible keys' NaN/Inf can reach
a row, and they do: the fast-math flags below leave out ``nnan``/``ninf``, so a NaN score propagates.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from pathlib import Path

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
    from threadpoolctl import ThreadpoolController
except ImportError:  # the XLA pass runs instead
    numba = None

# Reassociation and friends (vectorised reductions), but not nnan/ninf: a NaN score must reach its row.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
LOG2E = np.float32(1.4426950408889634)
# 2^f = 1 + f * P(f) on |f| <= 0.5 (Cephes' exp2f coefficients), ~1 ulp in float32.
C1, C2, C3 = np.float32(1.535336188319500e-4), np.float32(1.339887440266574e-3), np.float32(9.618437357674640e-3)
C4, C5, C6 = np.float32(5.550332471162809e-2), np.float32(2.402264791363012e-1), np.float32(6.931472028550421e-1)
ONE, HALF, LOW = np.float32(1.0), np.float32(0.5), np.float32(-126.0)
START = np.float32(-1e30)  # a row's running max before its first key: finite, wiped out by exp2(START - m) = 0


def _load_blas_single_threaded() -> None:
    """Load scipy's BLAS (what numba's ``np.dot`` calls) with one thread, unless scipy's BLAS is loaded
    already or the user set ``OPENBLAS_NUM_THREADS`` (then ``_blas_single_threaded`` judges it)."""
    if "scipy.linalg.cython_blas" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library; numba finds it there)
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


def _blas_single_threaded() -> bool:
    """Whether scipy's BLAS runs one thread: the libraries under a ``scipy*`` folder (the wheels'
    ``scipy.libs``), or, where scipy shares a system BLAS, every BLAS library in the process."""
    blas = [lib for lib in ThreadpoolController().info() if lib["user_api"] == "blas"]
    scipys = [lib for lib in blas if Path(lib["filepath"]).parent.name.startswith("scipy")]
    return all(lib["num_threads"] == 1 for lib in scipys or blas)


@functools.cache
def available() -> bool:
    """Whether the fused pass can run at its speed: numba imported and scipy's BLAS runs one thread."""
    return numba is not None and _blas_single_threaded()


if numba is not None:
    @intrinsic
    def _bits_as_f32(typingctx, x):
        """An int32's bits as a float32 (a plain bitcast, which LLVM vectorises)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @intrinsic
    def _fmax(typingctx, a, b):
        """``llvm.maxnum.f32``: numba's ``max`` is a compare and branch whose reduction loops LLVM does not
        vectorise (3 G/s per core against ~26 G/s, the prototype's record). A NaN score is not taken as
        the max here; it still reaches the row through its own exp2 below."""
        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32]), "llvm.maxnum.f32")
            return builder.call(fn, args)

        return types.float32(types.float32, types.float32), codegen

    @numba.njit(inline="always", fastmath=FAST)
    def _exp2(t):
        """2^t for t <= 0 (clamped at 2^-126; NaN stays NaN): 2^(t - n) by polynomial, 2^n by exponent bits."""
        if t < LOW:
            t = LOW
        n = np.floor(t + HALF)
        f = t - n
        p = ((((C1 * f + C2) * f + C3) * f + C4) * f + C5) * f + C6
        return (ONE + f * p) * _bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))

    @numba.njit(inline="always", fastmath=FAST)
    def _key_block(qt, kt, vt, acc, peak, total, rescale, b, h, i0, j0, block_q, block_k, n_init, n_local):
        """Fold key block ``[j0, j0 + block_k)`` into one job's online softmax. Row ``r`` (query ``i = i0 +
        r % block_q``) sees key ``j <= i`` if ``j < n_init`` (a sink) or ``i - j < n_local`` (its window):
        in the block, the sinks ``[0, a)`` and the window ``[w0, w1)``, the rest scored 0."""
        s = np.dot(qt, kt[b, h, j0:j0 + block_k].T)  # [rows, block_k]
        for r in range(qt.shape[0]):
            i = i0 + r % block_q
            end = min(i - j0 + 1, block_k)  # keys past the row: never seen
            a = max(0, min(n_init - j0, end))
            w0 = max(a, i - n_local + 1 - j0)
            w1 = max(w0, end)
            if a == 0 and w0 >= w1:  # nothing of the block for this row
                s[r, :] = 0
                rescale[r] = ONE
                continue
            # views, so that every loop index starts at 0: numba then drops its negative-index check and
            # LLVM vectorises the loops (with ``range(w0, w1)`` on ``s`` itself the kernel ran 1.85x slower)
            sinks, window = s[r, :a], s[r, w0:w1]
            top = peak[r]
            for j in range(sinks.shape[0]):
                top = _fmax(top, sinks[j])
            for j in range(window.shape[0]):
                top = _fmax(top, window[j])
            rescale[r] = _exp2(peak[r] - top)
            row_sum = np.float32(0.0)
            for j in range(sinks.shape[0]):
                e = _exp2(sinks[j] - top)
                sinks[j] = e
                row_sum += e
            for j in range(window.shape[0]):
                e = _exp2(window[j] - top)
                window[j] = e
                row_sum += e
            s[r, a:w0] = 0
            s[r, w1:] = 0
            total[r] = total[r] * rescale[r] + row_sum
            peak[r] = top
        pv = np.dot(s, vt[b, h, j0:j0 + block_k])  # [rows, D]
        for r in range(qt.shape[0]):
            for c in range(acc.shape[1]):
                acc[r, c] = acc[r, c] * rescale[r] + pv[r, c]

    @numba.njit(fastmath=FAST, cache=True)
    def _query_block(q, kt, vt, out, b, h, qb, block_q, block_k, n_init, n_local):
        """One job: batch row ``b``, KV head ``h``, query block ``qb``, its G heads stacked as rows; the
        key blocks holding sinks (below the window's), then those the block's windows reach."""
        n, g_size, d = q.shape[1], q.shape[3], q.shape[4]
        rows = g_size * block_q
        i0 = qb * block_q
        here = min(block_q, n - i0)
        scale = np.float32(1.0 / math.sqrt(d)) * LOG2E  # scores in log2 units: e^x = 2^(x log2 e)
        qt = np.zeros((rows, d), np.float32)
        for g in range(g_size):
            for ii in range(here):
                for c in range(d):
                    qt[g * block_q + ii, c] = q[b, i0 + ii, h, g, c] * scale
        acc = np.zeros((rows, d), np.float32)
        peak = np.full(rows, START, np.float32)
        total = np.zeros(rows, np.float32)
        rescale = np.empty(rows, np.float32)
        first = max(0, i0 - n_local + 1) // block_k
        for kb in range(min(first, (n_init + block_k - 1) // block_k)):
            _key_block(qt, kt, vt, acc, peak, total, rescale, b, h, i0, kb * block_k, block_q, block_k, n_init, n_local)
        for kb in range(first, (i0 + block_q - 1) // block_k + 1):
            _key_block(qt, kt, vt, acc, peak, total, rescale, b, h, i0, kb * block_k, block_q, block_k, n_init, n_local)
        for g in range(g_size):
            for ii in range(here):
                inv = ONE / total[g * block_q + ii]
                for c in range(d):
                    out[b, i0 + ii, h, g, c] = acc[g * block_q + ii, c] * inv

    _load_blas_single_threaded()

    @numba.njit(parallel=True, fastmath=FAST, cache=True)
    def _kernel(q, kt, vt, out, live_blocks, block_q, block_k, n_init, n_local):
        """``out`` rows of query blocks ``< live_blocks``: softmax(q k^T / sqrt(D)) v over each row's sinks
        and window, q ``[B, T, Hkv, G, D]``, head-major zero-padded ``kt``/``vt`` ``[B, Hkv, Tp, D]``;
        jobs in parallel, query block ``c`` with ``n - 1 - c`` so that every thread gets the same causal work."""
        half = (live_blocks + 1) // 2
        jobs = q.shape[2] * half
        for p in numba.prange(q.shape[0] * jobs):
            b, h, c = p // jobs, (p % jobs) // half, p % half
            _query_block(q, kt, vt, out, b, h, c, block_q, block_k, n_init, n_local)
            if live_blocks - 1 - c != c:
                _query_block(q, kt, vt, out, b, h, live_blocks - 1 - c, block_q, block_k, n_init, n_local)


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


# One call at a time: each call already uses every core.
_ONE_AT_A_TIME = threading.Lock()


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, live: np.ndarray, *, n_init: int, n_local: int,
           block_q: int, block_k: int) -> np.ndarray:
    """GQA attention on the host, row ``i`` over keys ``j <= i`` with ``j < n_init`` or ``i - j < n_local``
    (dense causal: ``n_init = 0``, ``n_local >= T``): q ``[B, T, Hkv, G, D]``, k/v ``[B, T, Hkv, D]``
    float32, rows of query blocks ``< live`` computed (the rest zero), float32 out like q. BLAS runs one
    thread per parallel job (threadpoolctl): its own pool inside each job oversubscribed 2 cores (2.1x
    slower)."""
    with _ONE_AT_A_TIME, _blas().limit(limits=1, user_api="blas"):
        b, t, hkv, g, d = q.shape
        live_blocks = -(-int(live) // block_q)
        # keys up to the last live query block's end, in whole key blocks: padded keys lie after every
        # real query, so the diagonal already hides them
        padded = -(-(live_blocks * block_q) // block_k) * block_k
        kt, vt = (np.zeros((b, hkv, max(padded, t), d), np.float32) for _ in range(2))
        kt[:, :, :t] = np.asarray(k, np.float32).transpose(0, 2, 1, 3)
        vt[:, :, :t] = np.asarray(v, np.float32).transpose(0, 2, 1, 3)
        out = np.zeros(q.shape, np.float32)
        if live_blocks:
            _kernel(np.ascontiguousarray(q, np.float32), kt, vt, out, live_blocks, block_q, block_k, n_init, n_local)
        return out
