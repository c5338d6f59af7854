"""Prototype: a fused causal GQA attention for the CPU in numba, called from JAX, against XLA and PyTorch.

Why it exists: on a 2-core CPU our XLA causal attention (``tmjax.causal_attention``, an online-softmax
loop over query/key tiles) is ~2x slower than PyTorch's SDPA for SmolLM2's heads, because XLA runs
max / exp / sum / the two products as separate fusions over big score tiles (memory-bound passes; see
``bench/NOTES.md``, "CPU causal pass: where the time goes"). PyTorch's kernel keeps a small score tile
in cache across all of them. This script tests whether a kernel of that shape, written in numba and
reached through ``jax.pure_callback``, closes the gap. It is a measurement, not a shipped path: numba
is not a project dependency (``pip install numba`` into the venv to run it).

Kernel: for each (KV head, query block of ``block_q`` rows) the G query heads of the group are stacked
as ``G * block_q`` rows; the key blocks up to the diagonal are visited with scores ``Q @ K_blk.T``
(BLAS through ``np.dot``) in a small tile, the causal mask only where a key block crosses the diagonal,
an online softmax (running max, rescale, a vectorisable exp2 polynomial in place) and ``acc += P @ V_blk``
(BLAS), then one divide. The (KV head, query block) jobs run under ``numba.prange``, paired as block c
with block n-1-c so that both threads get the same causal work.

Checks (exit non-zero on failure): the kernel against a float64 numpy reference at the real shape and at
a length that is not a multiple of the blocks. Timing, one process, systems interleaved, medians:
(a) the numba kernel on numpy arrays, (b) the same through ``jax.jit`` + ``jax.pure_callback``,
(c) ``tmjax.causal_attention`` jitted as ``bench/cpu_prefill.py --breakdown`` times "one layer's causal
attention", (d) PyTorch SDPA ``is_causal=True, enable_gqa=True`` on ``[B, H, T, D]`` inputs.

    python bench/cpu_fused_attention.py --out bench/results/cpu-fused-attention-prototype
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numba's np.dot is scipy's OpenBLAS: one thread per prange worker

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

import tmjax

LOG2E = np.float32(1.4426950408889634)
# Cephes exp2f: 2^f = 1 + f * P(f) on |f| <= 0.5, ~1 ulp in float32.
C1, C2, C3 = np.float32(1.535336188319500e-4), np.float32(1.339887440266574e-3), np.float32(9.618437357674640e-3)
C4, C5, C6 = np.float32(5.550332471162809e-2), np.float32(2.402264791363012e-1), np.float32(6.931472028550421e-1)
ONE, HALF, LOW = np.float32(1.0), np.float32(0.5), np.float32(-126.0)
NEG_INF = np.float32(-np.inf)


@intrinsic
def _bits_as_f32(typingctx, x):
    """Reinterpret an int32 as float32 (a plain bitcast, so LLVM can vectorise loops using it)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _fmax(typingctx, a, b):
    """``llvm.maxnum.f32`` with fast-math flags: numba's own ``max`` is a compare-and-branch whose loop
    reductions LLVM does not vectorise (3 G/s per core vs ~26 G/s measured for this on a 192x128 tile)."""
    sig = types.float32(types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32]), "llvm.maxnum.f32")
        return builder.call(fn, args, fastmath=("fast",))

    return sig, codegen


@numba.njit(inline="always", fastmath=True)
def _exp2(t: np.float32) -> np.float32:
    """2^t for t <= 0 in float32 (clamped at 2^-126): n = round(t), 2^(t-n) by polynomial, 2^n by bits."""
    t = max(t, LOW)
    n = np.floor(t + HALF)
    f = t - n
    p = ((((C1 * f + C2) * f + C3) * f + C4) * f + C5) * f + C6
    return (ONE + f * p) * _bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@numba.njit(fastmath=True, cache=True)
def _query_block(q: np.ndarray, kt: np.ndarray, vt: np.ndarray, out: np.ndarray, h: int, qb: int,
                 block_q: int, block_k: int) -> None:
    """One (KV head ``h``, query block ``qb``) job: all G heads of the group stacked as rows."""
    n, heads, d = q.shape[1], q.shape[2], q.shape[3]
    g_size = heads // kt.shape[0]
    rows = g_size * block_q
    i0 = qb * block_q
    scale = np.float32(1.0 / math.sqrt(d)) * LOG2E  # scores in log2 units: exp(x) = 2^(x log2 e)
    qt = np.zeros((rows, d), np.float32)
    for g in range(g_size):
        for ii in range(min(block_q, n - i0)):
            for c in range(d):
                qt[g * block_q + ii, c] = q[0, i0 + ii, h * g_size + g, c] * scale
    acc = np.zeros((rows, d), np.float32)
    m = np.full(rows, NEG_INF, np.float32)
    l = np.zeros(rows, np.float32)
    alpha = np.empty(rows, np.float32)
    last = i0 + block_q - 1
    for kb in range(last // block_k + 1):
        j0 = kb * block_k
        s = np.dot(qt, kt[h, j0:j0 + block_k].T)  # [rows, block_k]
        crosses = j0 + block_k - 1 > i0
        for r in range(rows):
            valid = block_k
            if crosses:
                valid = min(block_k, i0 + r % block_q - j0 + 1)
            if valid <= 0:
                s[r, :] = 0
                alpha[r] = ONE
                continue
            mx = m[r]
            for j in range(valid):
                mx = _fmax(mx, s[r, j])
            alpha[r] = _exp2(m[r] - mx)
            total = np.float32(0.0)
            for j in range(valid):
                e = _exp2(s[r, j] - mx)
                s[r, j] = e
                total += e
            for j in range(valid, block_k):
                s[r, j] = 0
            l[r] = l[r] * alpha[r] + total
            m[r] = mx
        pv = np.dot(s, vt[h, j0:j0 + block_k])  # [rows, d]
        for r in range(rows):
            a = alpha[r]
            for c in range(d):
                acc[r, c] = acc[r, c] * a + pv[r, c]
    for g in range(g_size):
        for ii in range(min(block_q, n - i0)):
            inv = ONE / l[g * block_q + ii]
            for c in range(d):
                out[0, i0 + ii, h * g_size + g, c] = acc[g * block_q + ii, c] * inv


@numba.njit(parallel=True, fastmath=True, cache=True)
def _fused_kernel(q: np.ndarray, kt: np.ndarray, vt: np.ndarray, out: np.ndarray, block_q: int, block_k: int) -> None:
    """``out[0] = causal softmax(q k^T / sqrt(D)) v`` over ``q [1, T, H, D]`` and head-major, zero-padded
    ``kt``/``vt [Hk, Tp, D]``; jobs paired (c, n-1-c) per KV head for an even causal split."""
    n_q = (q.shape[1] + block_q - 1) // block_q
    half = (n_q + 1) // 2
    for p in numba.prange(kt.shape[0] * half):
        h, c = p // half, p % half
        _query_block(q, kt, vt, out, h, c, block_q, block_k)
        if n_q - 1 - c != c:
            _query_block(q, kt, vt, out, h, n_q - 1 - c, block_q, block_k)


def fused_attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, block_q: int = 32, block_k: int = 128) -> np.ndarray:
    """Causal GQA attention of ``q [1, T, H, D]``, ``k, v [1, T, Hk, D]`` float32 (full length), numpy in/out."""
    b, n, heads, d = q.shape
    if b != 1 or heads % k.shape[2] or q.dtype != np.float32:
        raise ValueError(f"prototype takes batch 1 float32 GQA, got {q.shape} {k.shape} {q.dtype}")
    # Keys up to the last query block's end (block_q rows) rounded up to block_k, zero-padded; padded keys
    # lie after every real query, so the diagonal mask already excludes them.
    n_pad = -(-(-(-n // block_q) * block_q) // block_k) * block_k
    kt = np.zeros((k.shape[2], n_pad, d), np.float32)
    vt = np.zeros((k.shape[2], n_pad, d), np.float32)
    kt[:, :n] = k[0].transpose(1, 0, 2)
    vt[:, :n] = v[0].transpose(1, 0, 2)
    out = np.empty_like(q)
    _fused_kernel(np.ascontiguousarray(q), kt, vt, out, block_q, block_k)
    return out


def fused_attention_jax(q: jax.Array, k: jax.Array, v: jax.Array, block_q: int = 32, block_k: int = 128) -> jax.Array:
    """The same through ``jax.pure_callback`` (forward only: no VJP, no vmap rule beyond the default)."""
    def host(q, k, v):
        return fused_attention_np(np.asarray(q), np.asarray(k), np.asarray(v), block_q, block_k)
    return jax.pure_callback(host, jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Dense causal GQA attention in float64, head by head (query head h reads KV head h // G)."""
    n, heads, d = q.shape[1:]
    g_size = heads // k.shape[2]
    mask = np.tril(np.ones((n, n), bool))
    out = np.empty(q.shape, np.float64)
    for h in range(heads):
        s = q[0, :, h].astype(np.float64) @ k[0, :, h // g_size].astype(np.float64).T / math.sqrt(d)
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[0, :, h] = (p / p.sum(-1, keepdims=True)) @ v[0, :, h // g_size].astype(np.float64)
    return out


def inputs(n: int, heads: int, kv_heads: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, n, h, d), dtype=np.float32) for h in (heads, kv_heads, kv_heads))


def timed(systems: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """One warm-up each, then ``repeats`` interleaved rounds; seconds per call."""
    for run in systems.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, run in systems.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=3858, help="tokens (SmolLM2 demo prompt: 3858)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiles", default="32x128",
                        help="comma-separated block_q x block_k tiles for the numba kernel; the first is the "
                             "one also timed through JAX")
    parser.add_argument("--check-seq", type=int, default=1000, help="extra correctness length (not a block multiple)")
    parser.add_argument("--tolerance", type=float, default=5e-5, help="max abs error vs float64 reference")
    parser.add_argument("--out", default=None, help="folder for the JSON of raw times (printed only if omitted)")
    args = parser.parse_args()
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",")]
    torch_threads = os.cpu_count() or 1
    load_before = os.getloadavg()

    import torch
    torch.set_num_threads(torch_threads)

    # numba compile (first call) and cache: a tiny call compiles (or loads from __pycache__).
    t0 = time.perf_counter()
    fused_attention_np(*inputs(70, args.heads, args.kv_heads, args.head_dim, 9), *tiles[0])
    first_call_s = time.perf_counter() - t0
    cache_hits = {name: sum(f.stats.cache_hits.values()) for name, f in (("kernel", _fused_kernel), ("block", _query_block))}
    cache_misses = {name: sum(f.stats.cache_misses.values()) for name, f in (("kernel", _fused_kernel), ("block", _query_block))}
    print(f"numba first call {first_call_s:.2f} s; cache hits {cache_hits}, misses {cache_misses}; "
          f"threads {numba.get_num_threads()} ({numba.threading_layer()})")

    errors = {}
    for n in (args.check_seq, args.seq):
        q, k, v = inputs(n, args.heads, args.kv_heads, args.head_dim, n)
        ref = reference(q, k, v)
        for bq, bk in tiles:
            errors[f"numba {bq}x{bk} T={n}"] = float(np.max(np.abs(fused_attention_np(q, k, v, bq, bk) - ref)))
        errors[f"numba via pure_callback T={n}"] = float(np.max(np.abs(
            np.asarray(jax.jit(fused_attention_jax)(q, k, v)) - ref)))
        errors[f"tmjax.causal_attention T={n}"] = float(np.max(np.abs(
            np.asarray(jax.jit(tmjax.causal_attention)(q, k, v)) - ref)))
        qt, kt_, vt_ = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        errors[f"PyTorch SDPA T={n}"] = float(np.max(np.abs(torch.nn.functional.scaled_dot_product_attention(
            qt, kt_, vt_, is_causal=True, enable_gqa=True).transpose(1, 2).numpy() - ref)))
    for name, err in errors.items():
        print(f"max |error| vs float64 {name}: {err:.2e}")
    bad = {name: e for name, e in errors.items() if name.startswith("numba") and not e <= args.tolerance}
    if bad:
        sys.exit(f"numba kernel mismatch (tolerance {args.tolerance}): {bad}")

    q, k, v = inputs(args.seq, args.heads, args.kv_heads, args.head_dim, 0)
    qj, kj, vj = (jnp.asarray(x) for x in (q, k, v))
    qt, kt_, vt_ = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
    callback = jax.jit(lambda q, k, v: fused_attention_jax(q, k, v, *tiles[0]))
    layer = jax.jit(lambda q, k, v: tmjax.causal_attention(q, k, v))  # as cpu_prefill.py --breakdown (there v = k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    systems: dict[str, Callable[[], object]] = {}
    for bq, bk in tiles:
        systems[f"(a) numba {bq}x{bk}, numpy in/out"] = lambda bq=bq, bk=bk: fused_attention_np(q, k, v, bq, bk)
    systems[f"(b) numba {tiles[0][0]}x{tiles[0][1]} via jax.jit + pure_callback"] = lambda: callback(qj, kj, vj).block_until_ready()
    systems["(c) tmjax.causal_attention (XLA), jitted"] = lambda: layer(qj, kj, vj).block_until_ready()
    systems["(d) PyTorch SDPA is_causal, enable_gqa"] = lambda: sdpa(qt, kt_, vt_, is_causal=True, enable_gqa=True)
    times = timed(systems, args.repeats)
    torch_s = statistics.median(times["(d) PyTorch SDPA is_causal, enable_gqa"])
    rows = [dict(system=name, median_ms=1e3 * statistics.median(t), times_ms=[1e3 * x for x in t],
                 vs_pytorch=statistics.median(t) / torch_s) for name, t in times.items()]
    print(f"\nT={args.seq}, q heads {args.heads}, kv heads {args.kv_heads}, D={args.head_dim}, float32, "
          f"medians of {args.repeats} interleaved\n| system | median ms | min ms | vs PyTorch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['median_ms']:.1f} | {min(r['times_ms']):.1f} | {r['vs_pytorch']:.2f}x |")

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    meta = dict(machine=f"{model}, {os.cpu_count()} CPUs", node=platform.node(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                jax=jax.__version__, numba=numba.__version__, torch=torch.__version__, numpy=np.__version__,
                shape=dict(seq=args.seq, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim),
                threads=dict(numba=numba.get_num_threads(), numba_layer=numba.threading_layer(), torch=torch.get_num_threads(),
                             openblas=os.environ.get("OPENBLAS_NUM_THREADS")),
                numba_first_call_s=first_call_s, numba_cache_hits=cache_hits, numba_cache_misses=cache_misses,
                max_abs_error_vs_float64=errors, repeats=args.repeats,
                load_average_before=load_before, load_average_after=os.getloadavg(),
                command="python bench/cpu_fused_attention.py " + " ".join(sys.argv[1:]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu-fused-attention.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
