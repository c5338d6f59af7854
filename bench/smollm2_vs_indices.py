"""The columns and diagonals SmolLM2-135M-Instruct's layers keep under vertical-slash, on a real prompt.

Runs the model once per length over the demo's haystack prompt (dense attention), and in every
layer estimates the vertical-slash picks for each ``--budgets`` pair from that layer's own q/k. Writes
``smollm2-vs-indices.npz`` (``columns_<n>_<layer>``, ``diagonals_<n>_<layer>`` for the first budget:
the real-structure index sets ``bench/vertical_slash.py`` times) and ``smollm2-vs-density.json``: per
budget, length and layer, the share of causal (query, key) pairs the kernel computes. ``--gammas``
adds the same share for FlexPrefill (defaults, each ``gamma``) and for vertical-slash with
``mass=gamma`` (caps: the first budget), unguarded and with the density guard at ``--dense-above``.
Lengths beyond the model's trained 8K positions are fine for timing and for structure, not for accuracy.

    python bench/smollm2_vs_indices.py --lengths 8192 --budgets 1000/6096,256/1024 --out bench/results
    python bench/smollm2_vs_indices.py --lengths 8192 --gammas 0.9,0.95,0.99 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_capture import haystack_tokens, smollm2  # noqa: E402
from vertical_slash import visited_fraction  # noqa: E402

import tmjax  # noqa: E402
from tmjax import attention  # noqa: E402
from tmjax.models import decoder  # noqa: E402
from tmjax.pallas_kernels import dynamic_tables  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--budgets", default="1000/6096", help="vertical/slash pairs, comma-separated")
    parser.add_argument("--gammas", default="", help="FlexPrefill and vertical-slash masses, comma-separated")
    parser.add_argument("--dense-above", type=float, default=0.9, help="the density guard's threshold for --gammas")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()

    params, tok = smollm2(args.dtype)
    budgets = [tuple(int(x) for x in b.split("/")) for b in args.budgets.split(",")]
    gammas = [float(g) for g in args.gammas.split(",") if g]
    picks: dict = {}
    shares: list = []  # (method, gamma, layer, (unguarded table, guarded table)) of --gammas

    def hook(layer, q, k, v, length):
        for vertical, slash in budgets:
            cols, diags = tmjax.vertical_slash_indices(q, k, vertical=vertical, slash=slash, length=length)
            jax.debug.callback(lambda layer, c, d, key=(vertical, slash): picks.setdefault(key, {}).__setitem__(
                int(layer), (np.asarray(c), np.asarray(d))), layer, cols, diags)
        for gamma in gammas:
            for method, table in mass_tables(q, k, length, gamma, budgets[0], args.dense_above).items():
                jax.debug.callback(lambda layer, counts, key=(method, gamma): shares.append(
                    (*key, int(layer), counts)), layer, table)
        return tmjax.causal_attention(q, k, v, length=length)

    run = jax.jit(lambda p, t: decoder.prefill_hidden(p, t, t.shape[1], runs=((0, p.config.num_layers, hook),))[0][:, -1])
    arrays, density = {}, []
    for n in (int(x) for x in args.lengths.split(",")):
        tokens = haystack_tokens(tok, n)
        picks.clear()
        jax.block_until_ready(run(params, tokens))
        for (vertical, slash), layers in picks.items():
            for layer, (cols, diags) in sorted(layers.items()):
                table = dynamic_tables.vertical_slash(jnp.asarray(cols), jnp.asarray(diags), jnp.full((1,), n, jnp.int32),
                                             -(-n // 64) * 64)
                density.append(dict(n=n, vertical=vertical, slash=slash, layer=layer,
                                    visited_fraction=visited_fraction(table, n)))
                if (vertical, slash) == budgets[0]:
                    arrays[f"columns_{n}_{layer}"], arrays[f"diagonals_{n}_{layer}"] = cols, diags
        for method, gamma, layer, (open_table, guarded_table) in shares:
            for guarded, table in ((False, open_table), (True, guarded_table)):
                density.append(dict(n=n, method=method, gamma=gamma, guard=guarded, layer=layer,
                                    visited_fraction=visited_fraction(table, n)))
        shares.clear()
        print(json.dumps([r for r in density if r["n"] == n]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "smollm2-vs-indices.npz", **arrays)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, dtype=args.dtype,
                command="python bench/smollm2_vs_indices.py " + " ".join(sys.argv[1:]))
    (out / "smollm2-vs-density.json").write_text(json.dumps(dict(meta=meta, rows=density), indent=1))


def mass_tables(q, k, length, gamma: float, caps: tuple[int, int], dense_above: float) -> dict:
    """The 64-token tables of FlexPrefill (defaults but ``gamma``) and of vertical-slash with
    ``mass=gamma`` under ``caps``, each unguarded and guarded at ``dense_above``: ``{method: (open, guarded)}``."""
    n = q.shape[1]
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    padded = -(-n // dynamic_tables.BLOCK) * dynamic_tables.BLOCK
    fp = tmjax.FlexPrefill(gamma=gamma)
    selection = attention._select(q, k, fp, lengths)
    cols, diags = tmjax.vertical_slash_indices(q, k, vertical=caps[0], slash=caps[1], mass=gamma, length=length)
    return {
        "flexprefill": tuple(dynamic_tables.flexprefill(selection, lengths, padded, fp.block, dense_above=d)
                             for d in (None, dense_above)),
        "vertical_slash_mass": tuple(dynamic_tables.vertical_slash(cols, diags, lengths, padded, dense_above=d)
                                     for d in (None, dense_above)),
    }


if __name__ == "__main__":
    main()
