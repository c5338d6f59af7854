"""Where a dynamic table stops paying: one backend's table kernel on 64-token key-block lists keeping a
share ``f`` of each row's causal blocks (the diagonal and block 0 always, the rest drawn at random) beside
its dense causal kernel; the crossover is the density guard's ``dense_above`` for the backend's tuning
table (``pallas_kernels/tuning_tables/<backend>.json``, ``density``).

    python bench/density_threshold.py --implementation xla --seq-len 4096 --out /tmp/density
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tmjax import attention
from tmjax.pallas_kernels import density, dynamic_tables


def lists(rng: np.random.Generator, heads: int, nq: int, share: float) -> np.ndarray:
    """Int32 ``[1, H, nq, nq]`` key-block lists keeping about ``share`` of each row's causal blocks."""
    keep = rng.random((1, heads, nq, nq)) < share
    qb, kb = np.arange(nq)[:, None], np.arange(nq)[None, :]
    keep |= (kb == qb) | (kb == 0)
    return np.where(keep & (kb <= qb), kb, nq).astype(np.int32)


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementation", default="xla")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", default="8,2", help="query heads, KV heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shares", default="0.3,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    hq, hkv = (int(x) for x in args.heads.split(","))
    t, nq = args.seq_len, -(-args.seq_len // 64)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, h, args.head_dim), np.float32), args.dtype)
               for h in (hq, hkv, hkv))
    lengths = jnp.asarray([t], jnp.int32)
    causal = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, implementation=args.implementation))
    table_attention = jax.jit(lambda q, k, v, blocks: attention.attend_table(
        q, k, v, dynamic_tables.block_lists(blocks, lengths, nq * 64, 64), implementation=args.implementation))
    dense_ms = median_ms(causal, q, k, v, repeats=args.repeats)
    rows = []
    for share in (float(s) for s in args.shares.split(",")):
        blocks = jnp.asarray(lists(rng, hkv, nq, share))
        kept = jnp.sum(blocks < nq, axis=-1)
        fraction = float(density.kept_fraction(kept, lengths, 64)[0].mean())
        ms = median_ms(table_attention, q, k, v, blocks, repeats=args.repeats)
        rows.append(dict(share=share, kept_fraction=fraction, table_ms=ms, causal_ms=dense_ms))
        print(f"kept {fraction:.3f}: table {ms:.1f} ms, dense causal {dense_ms:.1f} ms", flush=True)
    slower = [r["kept_fraction"] for r in rows if r["table_ms"] >= r["causal_ms"]]
    result = dict(device=jax.devices()[0].device_kind, implementation=args.implementation, seq_len=t, heads=[hq, hkv],
                  head_dim=args.head_dim, dtype=args.dtype, rows=rows,
                  crossover=min(slower) if slower else None)
    print("crossover (lowest kept fraction at which the table is not faster):", result["crossover"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"density-{args.implementation}-{t}.json"), "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
