"""One attention layer of the dynamic methods, end to end (estimation + selection + table + kernel, one
jitted call each), beside our dense causal kernel and cuDNN's.

Llama-3.1-8B's heads by default (32 q / 8 KV, head_dim 128), bf16, at each ``--seqs`` length, on two
inputs: (a) ``local``: q/k built from rotary-like position features, so attention peaks near the diagonal
and at a sink at position 0 (what trained models mostly do; the methods keep few blocks); (b)
``random``: standard-normal q/k (scattered picks: the worst case); (c) ``smollm2:<layer>``: the real q/k/v of
that layer of SmolLM2-135M-Instruct (dense prefill of the demo's haystack prompt at that length), run at
SmolLM2's own heads (9 q / 3 KV, head_dim 64) whatever ``--heads`` says. Methods: vertical-slash with fixed
budgets (``--vertical``/``--slash``, default 1000/6096), vertical-slash with ``mass=--mass`` (those
budgets as caps), FlexPrefill (``--gamma``), all with the density guard on (``--no-guard``: off); then
``causal_attention(implementation=...)`` (our causal table kernel),
``jax.nn.dot_product_attention(implementation="cudnn")`` and, at head_dim 128 where its wheel loads,
FlashAttention-3's dense causal kernel (``bench/fa3_peer.py``; a row saying why when it does not load). Per dynamic row: its table's steps (key
blocks plus column chunks) over the causal key blocks, mean over heads (above 1 when columns add
chunks), and whether the whole layer ran dense (every head's table the full causal one). Medians
(``bench/attention.py``'s ``median_ms``). Writes ``dynamic-layer-<device>-<date>.json`` and ``.md`` to
``--out``.

    python bench/dynamic_layer.py --seqs 32768,131072 --implementation mosaic_gpu --out $OUT
    python bench/dynamic_layer.py --seqs 1000 --heads 4,2,64 --dtype float32 --implementation xla --out /tmp/x  # CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import fa3_systems, median_ms  # noqa: E402
from smollm2_capture import capture  # noqa: E402

import tmjax  # noqa: E402
from tmjax import attention  # noqa: E402
from tmjax.pallas_kernels import density, dynamic_tables, tuning  # noqa: E402
from tmjax.pallas_kernels.lengths import round_up  # noqa: E402


def inputs(kind: str, n: int, hq: int, hkv: int, d: int, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    """q ``[1, n, hq, d]``, k and v ``[1, n, hkv, d]`` (see the module docstring for ``local``)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    if kind == "random":
        return tuple(jax.random.normal(key, (1, n, h, d), jnp.float32).astype(dtype)
                     for key, h in zip(keys, (hq, hkv, hkv)))
    pos = jnp.arange(n, dtype=jnp.float32)[:, None]
    freqs = 1.0 / (10000.0 ** (jnp.arange(d // 2, dtype=jnp.float32) / (d // 2)))
    angle = pos * freqs
    features = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)  # q_i . k_j = sum cos(w (i - j))
    sink = jnp.zeros((n, d)).at[0, 0].set(30.0)
    noise = [0.3 * jax.random.normal(key, (1, n, h, d)) for key, h in zip(keys, (hq, hkv, hkv))]
    scale = 4.0 / np.sqrt(d // 2)
    q = scale * features[None, :, None, :] + noise[0] + jnp.zeros((1, n, hq, d)).at[..., 0].set(1.0)
    k = scale * features[None, :, None, :] + sink[None, :, None, :] + noise[1]
    return q.astype(dtype), k.astype(dtype), noise[2].astype(dtype)


def smollm2_inputs(layer: int, n: int, dtype) -> tuple[jax.Array, ...]:
    """q/k/v ``[1, n, heads, 64]`` of SmolLM2's ``layer`` on the haystack prompt (bf16 checkpoint)."""
    return tuple(jnp.asarray(x, dtype) for x in capture(n, [layer], dtype="bfloat16")[layer])


def table_of(method, q, k) -> tuple[jax.Array, jax.Array]:
    """(table steps over causal key blocks, mean over heads; whether the layer runs dense)
    for one method on these inputs: its selection and table as the attention call builds them."""
    n = q.shape[1]
    lengths = jnp.full((1,), n, jnp.int32)
    run = attention.kernel(ARGS.implementation, "vertical_slash", q, k, k)
    threshold = None
    if method.guard:
        threshold = tuning.dense_above(run.name, q_heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[3],
                                       pattern="vertical_slash")
    padded = round_up(n, dynamic_tables.BLOCK)
    if isinstance(method, tmjax.FlexPrefill):
        sel = attention._select(q, k, method, lengths)
        table = dynamic_tables.flexprefill(sel, lengths, padded, method.block, threshold)
    else:
        cols, diags = attention._select(q, k, method, lengths)
        table = dynamic_tables.vertical_slash(cols, diags, lengths, padded, threshold)
    steps = table.num_steps + (table.n_chunks if table.columns is not None else 0)
    return density.kept_fraction(steps, lengths, dynamic_tables.BLOCK).mean(), density.all_causal(table, lengths)


def methods(args) -> dict:
    guard = not args.no_guard
    return {
        f"vertical-slash {args.vertical}/{args.slash}": tmjax.VerticalSlash(args.vertical, args.slash, guard=guard),
        f"vertical-slash mass {args.mass}": tmjax.VerticalSlash(args.vertical, args.slash, mass=args.mass, guard=guard),
        f"FlexPrefill gamma {args.gamma}": tmjax.FlexPrefill(gamma=args.gamma, vertical=args.vertical, slash=args.slash,
                                                             guard=guard),
    }


def call(method):
    if isinstance(method, tmjax.FlexPrefill):
        return jax.jit(lambda q, k, v: tmjax.flexprefill_attention(q, k, v, method, implementation=ARGS.implementation))
    return jax.jit(lambda q, k, v: attention.vertical_slash(q, k, v, method, implementation=ARGS.implementation))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="32768,131072")
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head_dim")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--implementation", default=None, help="backend (default: the platform's)")
    parser.add_argument("--inputs", default="local,random", help="local, random, smollm2:<layer> (comma-separated)")
    parser.add_argument("--vertical", type=int, default=1000)
    parser.add_argument("--slash", type=int, default=6096)
    parser.add_argument("--mass", type=float, default=0.9)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--no-guard", action="store_true")
    parser.add_argument("--min-time-s", type=float, default=0.5)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    global ARGS
    ARGS = args = parser.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.devices()[0].platform == "gpu"
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print("ROW", json.dumps(row), flush=True)

    dense = jax.jit(lambda q, k, v: tmjax.causal_attention(q, k, v, implementation=args.implementation or
                                                           attention.default_implementation()))
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    stats = jax.jit(table_of, static_argnums=0)
    missing: list[dict] = []  # fa3_systems' row saying why the peer did not load
    fa3 = {name: jax.jit(fn) for name, _, fn in (fa3_systems(missing.append) if on_gpu else [])}.get(
        "flash-attn3-jax dense causal")
    for n in (int(s) for s in args.seqs.split(",")):
        for kind in args.inputs.split(","):
            if kind.startswith("smollm2:"):
                q, k, v = smollm2_inputs(int(kind.split(":")[1]), n, dtype)
            else:
                q, k, v = inputs(kind, n, hq, hkv, d, dtype)
            for name, method in methods(args).items():
                visited, all_dense = stats(method, q, k)
                try:
                    ms = median_ms(call(method), q, k, v, min_time_s=args.min_time_s)
                except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
                    ms, error = None, f"{type(err).__name__}: {str(err)[:300]}"
                else:
                    error = None
                record(dict(n=n, inputs=kind, method=name, ms=ms, visited=float(visited), dense_layer=bool(all_dense),
                            error=error))
            record(dict(n=n, inputs=kind, method="dense causal (ours)", ms=median_ms(dense, q, k, v,
                                                                                   min_time_s=args.min_time_s)))
            if on_gpu and dtype in (jnp.bfloat16, jnp.float16):
                record(dict(n=n, inputs=kind, method="cuDNN dense causal", ms=median_ms(cudnn, q, k, v,
                                                                                      min_time_s=args.min_time_s)))
                if q.shape[-1] == 128:
                    record(dict(n=n, inputs=kind, method="FlashAttention-3 dense causal",
                                ms=fa3 and median_ms(fa3, q, k, v, min_time_s=args.min_time_s),
                                error=missing[0]["note"] if missing else None))
    device = jax.devices()[0].device_kind
    meta = dict(device=device, jax=jax.__version__, host=platform.node(), heads=[hq, hkv, d], dtype=args.dtype,
                implementation=args.implementation or attention.default_implementation(), guard=not args.no_guard,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dynamic-layer-{device.replace(' ', '_')}-{datetime.datetime.now().strftime('%Y%m%d-%H%M')}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    lines = [f"# One dynamic layer, {device}, heads {hq}/{hkv}/{d} (smollm2 rows 9/3/64), {args.dtype}, {meta['implementation']}, "
             f"guard {'on' if meta['guard'] else 'off'}", "",
             "| T | inputs | method | ms | steps / causal blocks | layer ran dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = "failed" if r.get("error") else f"{r['ms']:.3f}"
        visited = f"{r['visited']:.3f}" if "visited" in r else ""
        lines.append(f"| {r['n']} | {r['inputs']} | {r['method']} | {ms} | {visited} | {r.get('dense_layer', '')} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
