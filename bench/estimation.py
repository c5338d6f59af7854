"""Estimation cost of the dynamic methods at Llama-3.1-8B heads (32 query / 8 KV heads, head_dim 128).

One layer, batch 1, bf16 q/k: vertical-slash selection with fixed budgets 1000/6096, the same with
``mass=0.9`` (caps 1000/6096), and FlexPrefill's selection (defaults: gamma 0.9, tau 0.1, block 128,
max_blocks 1024). Inputs: random q/k (a worst case: the picks scatter) and a *local* pair (keys near
a query resemble it, so attention concentrates near the diagonal). Before timing, each selection is
checked: FlexPrefill's result does not depend on ``query_blocks_per_step``, every query block keeps its
diagonal block, every vertical-slash head keeps diagonal 0. Reported per method and length: median
time (no kernel), XLA's temporary memory of the compiled program, and what was kept. Writes
``estimation.json`` and ``estimation.md`` to ``--out``.

    python bench/estimation.py --seqs 32768,131072 --out bench/results/estimation
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import median_ms  # noqa: E402

from tmjax.pallas_kernels import flexprefill, vs_estimate  # noqa: E402

HQ, HKV, D = 32, 8, 128


def inputs(kind: str, t: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """bf16 q ``[1, T, 32, 128]`` and k ``[1, T, 8, 128]``: ``random`` standard normal, or ``local``:
    k a slowly drifting signal and q its own position's key plus noise."""
    key_q, key_k = jax.random.split(jax.random.PRNGKey(seed))
    if kind == "random":
        q = jax.random.normal(key_q, (1, t, HQ, D), jnp.float32)
        k = jax.random.normal(key_k, (1, t, HKV, D), jnp.float32)
    else:
        steps = jax.random.normal(key_k, (1, t, HKV, D), jnp.float32) * 0.05
        k = jnp.cumsum(steps, axis=1)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True) * 4.0
        q = jnp.repeat(k, HQ // HKV, axis=2) + 0.5 * jax.random.normal(key_q, (1, t, HQ, D), jnp.float32)
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)


def methods() -> dict:
    vs = dict(vertical=1000, slash=6096, last_q=64, force_vertical=30, force_slash=100, length=None, selection="group")
    fp = dict(gamma=0.9, tau=0.1, block=128, max_blocks=1024, vertical=1000, slash=6096, force_vertical=30,
              force_slash=100, length=None, selection="group")
    return {
        "vertical-slash 1000/6096": lambda q, k: vs_estimate.select(q, k, **vs),
        "vertical-slash mass 0.9": lambda q, k: vs_estimate.select(q, k, **vs, mass=0.9),
        "flexprefill": lambda q, k: flexprefill.select(q, k, **fp),
        "flexprefill (1 query block per step)": lambda q, k: flexprefill.select(q, k, **fp, query_blocks_per_step=1),
    }


def kept(result, t: int) -> dict:
    if isinstance(result, flexprefill.FlexSelection):
        qa = np.asarray(result.query_aware)
        n = result.blocks.shape[2]
        blocks = np.asarray(result.blocks)
        real_rows = blocks[..., 0] < n
        per_row = (blocks < n).sum(-1)
        return {"query_aware_heads": int(qa.sum()), "heads": int(qa.size),
                "blocks_per_query_block_mean": float(per_row[real_rows].mean()) if real_rows.any() else 0.0,
                "columns_mean": float((np.asarray(result.columns) < t).sum(-1)[~qa].mean()) if (~qa).any() else 0.0,
                "diagonals_mean": float((np.asarray(result.diagonals) < t).sum(-1)[~qa].mean()) if (~qa).any() else 0.0}
    cols, diags = (np.asarray(x) for x in result)
    return {"columns_mean": float((cols < t).sum(-1).mean()), "diagonals_mean": float((diags < t).sum(-1).mean())}


def check(results: dict, t: int) -> None:
    """The invariants above; raises on a violation (before anything is timed)."""
    a, b = results["flexprefill"], results["flexprefill (1 query block per step)"]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    qa, blocks = np.asarray(a.query_aware), np.asarray(a.blocks)
    n = blocks.shape[2]
    diagonal_kept = (blocks == np.arange(n)[None, None, :, None]).any(-1)
    assert diagonal_kept[qa].all(), "a query-aware query block lost its diagonal block"
    assert (np.asarray(a.diagonals)[~qa] == 0).any(-1).all(), "a vertical-slash head lost diagonal 0"
    for name in ("vertical-slash 1000/6096", "vertical-slash mass 0.9"):
        assert (np.asarray(results[name][1]) == 0).any(-1).all(), f"{name}: diagonal 0 missing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="32768,131072")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/estimation"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in (int(x) for x in args.seqs.split(",")):
        for kind in ("random", "local"):
            q, k = inputs(kind, t)
            compiled = {name: jax.jit(fn).lower(q, k).compile() for name, fn in methods().items()}
            results = {name: fn(q, k) for name, fn in compiled.items()}
            check(results, t)
            for name, fn in compiled.items():
                memory = fn.memory_analysis()
                row = {"tokens": t, "inputs": kind, "method": name, "ms": median_ms(fn, q, k),
                       "temp_mib": None if memory is None else memory.temp_size_in_bytes / 2**20, **kept(results[name], t)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "command": " ".join(["python", *sys.argv]), "heads": [HQ, HKV, D], "dtype": "bfloat16"}
    (out / "estimation.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# Estimation only, {meta['device']}, jax {meta['jax']}, {meta['date']}", "",
             "| tokens | inputs | method | ms | temp MiB | kept |", "|---|---|---|---|---|---|"]
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in ("tokens", "inputs", "method", "ms", "temp_mib")}
        temp = "-" if r["temp_mib"] is None else f"{r['temp_mib']:.0f}"
        lines.append(f"| {r['tokens']} | {r['inputs']} | {r['method']} | {r['ms']:.2f} | {temp} | "
                     + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rest.items()) + " |")
    (out / "estimation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
