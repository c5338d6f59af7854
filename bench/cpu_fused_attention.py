"""The fused CPU attention kernel (numba) timed beside XLA and PyTorch: one layer's causal attention.

Why it exists: on a 2-core CPU our XLA causal attention (``tmjax.causal_attention``, an online-softmax
loop over query/key tiles) is ~2x slower than PyTorch's SDPA for SmolLM2's heads, because XLA runs
max / exp / sum / the two products as separate fusions over big score tiles (memory-bound passes; see
``bench/NOTES.md``, "CPU causal pass: where the time goes"). PyTorch's kernel keeps a small score tile
in cache across all of them. This script measures the library's kernel of that shape,
``tmjax/pallas_kernels/cpu_fused.py`` (opt-in, ``xla.Tuning(fused=True)``; the ``cpu`` extra), directly
and through ``jax.pure_callback``. (It first held its own prototype of that kernel, which the record
``bench/results/cpu-fused-attention-prototype/`` measured; the library's kernel grew from it.)

Checks (exit non-zero on failure): the kernel against a float64 numpy reference at the real shape and at
a length that is not a multiple of the blocks. Timing, one process, systems interleaved, medians:
(a) the numba kernel on numpy arrays, (b) the same through ``jax.jit`` + ``jax.pure_callback``,
(c) ``tmjax.causal_attention`` jitted as ``bench/cpu_prefill.py --breakdown`` times "one layer's causal
attention", (d) PyTorch SDPA ``is_causal=True, enable_gqa=True`` on ``[B, H, T, D]`` inputs; with ``--band
n_init,n_local`` also (e) the kernel's band pass at every tile (checked against a float64 band reference),
the tiles the CPU tuning table picks from.

    python bench/cpu_fused_attention.py --out DIR
    python bench/cpu_fused_attention.py --tiles 32x128,32x64,64x64,16x64,32x256 --band 8,512 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
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

import tmjax
from tmjax.pallas_kernels import cpu_fused, xla


def fused_attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, block_q: int = 32, block_k: int = 128,
                       band: tuple[int, int] | None = None) -> np.ndarray:
    """The library's fused kernel (``cpu_fused.attend``; dense causal, or the band ``(n_init, n_local)``) on
    numpy: ``q [B, T, H, D]``, ``k, v [B, T, Hk, D]`` float32, full length."""
    b, n, heads, d = q.shape
    n_init, n_local = band or (0, n)
    grouped = q.reshape(b, n, k.shape[2], heads // k.shape[2], d)
    out = cpu_fused.attend(grouped, k, v, np.int32(n), n_init=n_init, n_local=n_local, block_q=block_q, block_k=block_k)
    return out.reshape(q.shape)


def fused_attention_jax(q: jax.Array, k: jax.Array, v: jax.Array, block_q: int = 32, block_k: int = 128) -> jax.Array:
    """The same as the library reaches it: ``tmjax.causal_attention`` on xla with ``Tuning(fused=True)``
    (``jax.pure_callback``)."""
    tuning = dataclasses.replace(xla.Tuning(), fused=True, fused_block_q=block_q, fused_block_kv=block_k)
    return tmjax.causal_attention(q, k, v, implementation="xla", tuning=tuning)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, band: tuple[int, int] | None = None) -> np.ndarray:
    """Causal GQA attention in float64, head by head (query head h reads KV head h // G); with ``band =
    (n_init, n_local)`` row i sees only keys j < n_init or i - j < n_local."""
    n, heads, d = q.shape[1:]
    g_size = heads // k.shape[2]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = j <= i if band is None else (j <= i) & ((j < band[0]) | (i - j < band[1]))
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
    parser.add_argument("--band", default=None,
                        help="n_init,n_local: also check and time the numba kernel's band pass at every tile")
    parser.add_argument("--check-seq", type=int, default=1000, help="extra correctness length (not a block multiple)")
    parser.add_argument("--tolerance", type=float, default=5e-5, help="max abs error vs float64 reference")
    parser.add_argument("--out", default=None, help="folder for the JSON of raw times (printed only if omitted)")
    args = parser.parse_args()
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",")]
    band = tuple(int(x) for x in args.band.split(",")) if args.band else None
    torch_threads = os.cpu_count() or 1
    load_before = os.getloadavg()

    import torch
    torch.set_num_threads(torch_threads)

    # numba compile (first call) and cache: a tiny call compiles (or loads from __pycache__).
    t0 = time.perf_counter()
    fused_attention_np(*inputs(70, args.heads, args.kv_heads, args.head_dim, 9), *tiles[0])
    first_call_s = time.perf_counter() - t0
    print(f"numba first call {first_call_s:.2f} s; threads {numba.get_num_threads()} ({numba.threading_layer()})")

    errors = {}
    for n in (args.check_seq, args.seq):
        q, k, v = inputs(n, args.heads, args.kv_heads, args.head_dim, n)
        ref = reference(q, k, v)
        for bq, bk in tiles:
            errors[f"numba {bq}x{bk} T={n}"] = float(np.max(np.abs(fused_attention_np(q, k, v, bq, bk) - ref)))
        if band:
            ref_band = reference(q, k, v, band)
            for bq, bk in tiles:
                errors[f"numba band {bq}x{bk} T={n}"] = float(np.max(np.abs(
                    fused_attention_np(q, k, v, bq, bk, band) - ref_band)))
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
    for bq, bk in tiles if band else ():
        systems[f"(e) numba band {band[0]},{band[1]} {bq}x{bk}"] = lambda bq=bq, bk=bk: fused_attention_np(q, k, v, bq, bk, band)
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
                numba_first_call_s=first_call_s,
                max_abs_error_vs_float64=errors, repeats=args.repeats,
                load_average_before=load_before, load_average_after=os.getloadavg(),
                command="python bench/cpu_fused_attention.py " + " ".join(sys.argv[1:]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu-fused-attention.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
