"""One-layer vertical-slash timings: estimation + index building + kernel, beside dense causal attention.

Where the kept items fall decides the cost, so three index sets are timed at each length:
(a) ``local``: the first ``vertical`` columns and the ``slash`` nearest diagonals (the best case);
(b) ``real``: the columns and diagonals SmolLM2-135M-Instruct's own layers pick at that length
    (``bench/smollm2_vs_indices.py`` writes them; its 3 KV groups are tiled over this shape's KV heads);
(c) ``random``: what the estimator picks on uniform random q/k (scattered: the worst case).
The estimation always runs on this shape's q/k; for (a) and (b) its time is added to the kernel's
(selection cost does not depend on where the picks fall). Every row is first checked against dense
float32 attention under the contract's mask on a sample of query rows. Medians. Writes
``vertical-slash-<device>-<date>.json`` and ``.md`` to ``--out``.

    python bench/vertical_slash.py --seqs 32768,65536,131072 --implementation mosaic_gpu \\
        --real-indices $OUT/smollm2-vs-indices.npz --out $OUT
    python bench/vertical_slash.py --heads 9,3,64 --dtype float32 --seqs 8192 --implementation xla  # CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import median_ms  # noqa: E402

import tmjax  # noqa: E402
from tmjax import attention  # noqa: E402
from tmjax.pallas_kernels import dynamic_tables, reference, tables  # noqa: E402


def contract_rows_mask(rows: np.ndarray, n: int, cols: np.ndarray, diags: np.ndarray) -> np.ndarray:
    """Bool ``[len(rows), n]``: the contract's mask rows for one head (``reference.vertical_slash_mask``
    restricted to the sampled rows, without the ``[n, n]`` matrix)."""
    bq = dynamic_tables.BLOCK
    cols, diags = cols[cols < n], diags[diags < n]
    out = np.zeros((len(rows), n), bool)
    for r, i in enumerate(rows):
        out[r, cols[cols <= i]] = True
        q0 = i // bq * bq
        real = np.arange(q0, min(q0 + bq, n))
        keys = (real[:, None] - diags[None, :]).reshape(-1)
        for kb in np.unique(keys[keys >= 0] // bq):
            out[r, kb * bq : min((kb + 1) * bq, i + 1)] = True
    return out


def visited_fraction(table: tables.Table, n: int) -> float:
    """Visible (query, key) pairs the table makes each row compute, over the causal pairs (mean over heads)."""
    bq = dynamic_tables.BLOCK
    steps = np.asarray(table.num_steps, np.int64)
    counted = np.asarray(jax.vmap(lambda c: tables.chunk_mask(table.column_bits, c), out_axes=-2)(
        jnp.arange(table.columns.shape[-1] // bq))).sum(axis=(-1, -2))
    live = steps > 0
    # full slash blocks: bq * bq pairs each; the diagonal block: bq (bq + 1) / 2; columns: bq rows each
    pairs = np.where(live, (steps - 1) * bq * bq + bq * (bq + 1) // 2, 0) + counted * bq
    return float(pairs.sum() / (steps.shape[0] * steps.shape[1] * n * (n + 1) / 2))


def index_sets(case: str, n: int, heads: int, args, q, k, real: dict | None):
    """``(columns, diagonals)`` ``[1, heads, budget]`` for one case, ascending, ``n`` in unused slots."""
    v_budget, s_budget = args.vertical, args.slash
    if case == "local":
        cols = np.broadcast_to(np.arange(v_budget, dtype=np.int32), (1, heads, v_budget))
        diags = np.broadcast_to(np.arange(s_budget, dtype=np.int32), (1, heads, s_budget))
        return jnp.asarray(np.minimum(cols, n)), jnp.asarray(np.minimum(diags, n))
    if case == "random":
        return tmjax.vertical_slash_indices(q, k, vertical=v_budget, slash=s_budget)
    cols, diags = real[f"columns_{n}_{args.real_layer}"], real[f"diagonals_{n}_{args.real_layer}"]  # [1, 3, budget]
    tile = np.arange(heads) % cols.shape[1]
    return jnp.asarray(cols[:, tile]), jnp.asarray(diags[:, tile])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="32768,65536,131072")
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head_dim")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--vertical", type=int, default=1000)
    parser.add_argument("--slash", type=int, default=6096)
    parser.add_argument("--cases", default="local,real,random")
    parser.add_argument("--real-indices", default=None, help="npz from bench/smollm2_vs_indices.py")
    parser.add_argument("--real-layer", type=int, default=8, help="which SmolLM2 layer's picks case (b) uses")
    parser.add_argument("--implementation", default="mosaic_gpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()

    hq, hkv, d = (int(x) for x in args.heads.split(","))
    dtype = jnp.dtype(args.dtype)
    real = dict(np.load(args.real_indices)) if args.real_indices else None
    cases = [c for c in args.cases.split(",") if c != "real" or real is not None]
    device = jax.devices()[0]
    kernel = jax.jit(lambda q, k, v, c, g: attention.attend_table(
        q, k, v, dynamic_tables.vertical_slash(c, g, jnp.full((1,), q.shape[1], jnp.int32), -(-q.shape[1] // 64) * 64),
        implementation=args.implementation))
    estimate = jax.jit(lambda q, k: tmjax.vertical_slash_indices(q, k, vertical=args.vertical, slash=args.slash))
    dense_impl = None if device.platform == "gpu" else "xla"
    dense = jax.jit(lambda q, k, v: tmjax.causal_attention(q, k, v, implementation=dense_impl))
    rows = []
    for n in (int(x) for x in args.seqs.split(",")):
        keys = jax.random.split(jax.random.key(n), 3)
        q = jax.random.normal(keys[0], (1, n, hq, d), dtype)
        k, v = (jax.random.normal(key, (1, n, hkv, d), dtype) for key in keys[1:])
        dense_ms = median_ms(dense, q, k, v)
        est_ms = median_ms(estimate, q, k)
        rows.append(dict(n=n, system="dense causal (" + ("cuDNN" if dense_impl is None else "xla") + ")", ms=dense_ms))
        rows.append(dict(n=n, system="estimation only", ms=est_ms))
        sample = np.unique(np.concatenate([np.arange(64), np.random.default_rng(0).integers(0, n, 96), np.arange(n - 64, n)]))
        for case in cases:
            cols, diags = index_sets(case, n, hkv, args, q, k, real)
            table = dynamic_tables.vertical_slash(cols, diags, jnp.full((1,), n, jnp.int32), -(-n // 64) * 64)
            out = kernel(q, k, v, cols, diags)
            masks = np.stack([contract_rows_mask(sample, n, np.asarray(cols[0, h]), np.asarray(diags[0, h]))
                              for h in range(hkv)])
            ref = reference.masked_attention(q[:, sample], k, v, np.repeat(masks, hq // hkv, axis=0)[None])
            err = float(jnp.linalg.norm((out[:, sample] - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
            kernel_ms = median_ms(kernel, q, k, v, cols, diags)
            fraction = visited_fraction(table, n)
            flops = 4 * fraction * n * (n + 1) / 2 * d * hq
            total = kernel_ms + est_ms
            rows.append(dict(n=n, system=f"vertical-slash ({case})", ms=total, kernel_ms=kernel_ms, estimation_ms=est_ms,
                             visited_fraction=fraction, useful_tflops=flops / total / 1e9, rel_l2=err,
                             speedup_vs_dense=dense_ms / total))
            print("ROW", json.dumps(rows[-1]), flush=True)
    meta = dict(device=device.device_kind, platform=platform.node(), date=datetime.date.today().isoformat(),
                jax=jax.__version__, heads=[hq, hkv, d], dtype=dtype.name, budgets=[args.vertical, args.slash],
                implementation=args.implementation, command="python bench/vertical_slash.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vertical-slash-{device.device_kind.replace(' ', '_')}-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"Vertical-slash, one layer ({hq} q / {hkv} KV heads, D {d}, {dtype.name}, batch 1, budgets "
             f"{args.vertical} / {args.slash}), {meta['device']}, {meta['date']}, jax {meta['jax']}",
             f"command: `{meta['command']}`", "",
             "| tokens | system | ms (median) | kernel ms | estimation ms | keys computed | vs dense | rel L2 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['system']} | {r['ms']:.3f} | {r.get('kernel_ms', float('nan')):.3f} | "
                     f"{r.get('estimation_ms', float('nan')):.3f} | {100 * r.get('visited_fraction', 1.0):.1f}% | "
                     f"{r.get('speedup_vs_dense', 1.0):.1f}x | {r.get('rel_l2', 0.0):.1e} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
