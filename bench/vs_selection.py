"""Per-group vs per-head vertical-slash selection on SmolLM2-135M-Instruct's real layers.

One dense prefill of the demo's haystack prompt; in every layer, from that layer's own q/k/v, the
vertical-slash output with each selection rule at the same budgets is compared with dense attention
(relative L2 error over the real rows, and over the last 64 rows, which decide the next token), and the
share of the causal attention each one computes is recorded. Then one layer's kernel is timed with each
rule on this machine (``--implementation``). Writes ``vs-selection.json`` and ``.md`` to ``--out``.

    python bench/vs_selection.py --tokens 8192 --vertical 128 --slash 512 --out bench/results/vs-selection
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import median_ms  # noqa: E402
from smollm2_capture import haystack_tokens, smollm2  # noqa: E402
from vertical_slash import visited_fraction  # noqa: E402

import tmjax  # noqa: E402
from tmjax.models import decoder  # noqa: E402
from tmjax.pallas_kernels import dynamic_tables  # noqa: E402

RULES = ("group", "head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vertical", type=int, default=128)
    parser.add_argument("--slash", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--implementation", default="xla")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/vs-selection"))
    args = parser.parse_args()

    params, tok = smollm2(args.dtype)
    n = args.tokens
    tokens = haystack_tokens(tok, n)
    found: dict = {}
    kept: dict = {}

    def hook(layer, q, k, v, length):
        dense = tmjax.causal_attention(q, k, v, length=length)
        for rule in RULES:
            budgets = dict(vertical=args.vertical, slash=args.slash, selection=rule, length=length)
            out = tmjax.vertical_slash_attention(q, k, v, **budgets, implementation=args.implementation)
            cols, diags = tmjax.vertical_slash_indices(q, k, **budgets)
            err = jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense)
            last = jnp.linalg.norm(out[:, -64:] - dense[:, -64:]) / jnp.linalg.norm(dense[:, -64:])
            jax.debug.callback(lambda i, e, f, c, d, rule=rule: (
                found.setdefault(rule, {}).__setitem__(int(i), (float(e), float(f))),
                kept.setdefault(rule, {}).__setitem__(int(i), (np.asarray(c), np.asarray(d)))), layer, err, last, cols, diags)
        return dense

    jax.block_until_ready(jax.jit(lambda p, t: decoder.prefill_hidden(p, t, n, runs=((0, p.config.num_layers, hook),))[0][:, -1])(params, tokens))
    rows = []
    for rule in RULES:
        for layer, (err, last) in sorted(found[rule].items()):
            cols, diags = kept[rule][layer]
            table = dynamic_tables.vertical_slash(jnp.asarray(cols), jnp.asarray(diags), jnp.full((1,), n, jnp.int32), -(-n // 64) * 64)
            rows.append(dict(selection=rule, layer=layer, rel_l2=err, rel_l2_last64=last, visited_fraction=visited_fraction(table, n)))
    # time one layer's kernel with each rule on that layer's own picks (real structure)
    c = params.config
    q = jax.random.normal(jax.random.key(0), (1, n, c.num_heads, c.head_dim), jnp.dtype(args.dtype))
    k, v = (jax.random.normal(jax.random.key(i), (1, n, c.num_kv_heads, c.head_dim), jnp.dtype(args.dtype)) for i in (1, 2))
    kernel = jax.jit(lambda q, k, v, cols, diags: tmjax.attention.attend_table(
        q, k, v, dynamic_tables.vertical_slash(cols, diags, jnp.full((1,), n, jnp.int32), -(-n // 64) * 64),
        implementation=args.implementation))
    timing = {}
    layer = sorted(found["group"])[len(found["group"]) // 2]
    for _ in range(3):
        for rule in RULES:
            cols, diags = (jnp.asarray(x) for x in kept[rule][layer])
            timing.setdefault(rule, []).append(median_ms(kernel, q, k, v, cols, diags, min_time_s=0.5))
    summary = {}
    for rule in RULES:
        mine = [r for r in rows if r["selection"] == rule]
        summary[rule] = dict(
            mean_rel_l2=statistics.mean(r["rel_l2"] for r in mine),
            mean_rel_l2_last64=statistics.mean(r["rel_l2_last64"] for r in mine),
            mean_visited_fraction=statistics.mean(r["visited_fraction"] for r in mine),
            kernel_ms_layer=statistics.median(timing[rule]), timed_layer=layer)
    meta = dict(machine=f"{platform.node()} ({os.cpu_count()} CPUs)", device=jax.devices()[0].device_kind,
                date=datetime.date.today().isoformat(), jax=jax.__version__, tokens=n,
                budgets=[args.vertical, args.slash], dtype=args.dtype, implementation=args.implementation,
                command="python bench/vs_selection.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs-selection.json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    lines = [f"Vertical-slash selection rule, SmolLM2-135M-Instruct ({args.dtype}), haystack prompt of {n} tokens, "
             f"budgets {args.vertical} / {args.slash}; {meta['machine']}, {meta['date']}, jax {meta['jax']}",
             f"command: `{meta['command']}`", "",
             "| selection | attention computed (mean over layers) | rel. L2 vs dense, all rows | last 64 rows "
             f"| kernel ms (layer {layer}, {args.implementation}) |", "|---|---|---|---|---|"]
    for rule, s in summary.items():
        lines.append(f"| {rule} | {100 * s['mean_visited_fraction']:.0f}% | {s['mean_rel_l2']:.3f} | "
                     f"{s['mean_rel_l2_last64']:.3f} | {s['kernel_ms_layer']:.0f} |")
    (out / "vs-selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
