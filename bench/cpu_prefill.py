"""CPU prefill of SmolLM2-135M-Instruct: tmjax (dense, TriangleMix) against transformers' PyTorch model.

One process, one prompt (the demo's haystack, 3858 tokens by default), float32. The PyTorch peer is
transformers' Llama loaded from the same GGUF file with SDPA attention, ``use_cache=False`` and only
the last position's logits (``logits_to_keep=1``), with as many threads as JAX uses. Each system
gets a warm-up, then the systems take turns for ``--repeats`` rounds (interleaved, so that a noisy
neighbour hits them alike); medians. With ``--breakdown`` it also times tmjax's prefill with the
attention replaced by the identity (non-attention time) and one layer's attention alone. With
``--chunks 512,768,1024`` tmjax's systems run once per XLA key chunk (the ``chunk`` of
``pallas_kernels/tuning_tables/xla.json``, 768 as shipped for the CPU: key rows per step of the causal
and last-rows passes, which take 256 query rows at a time), each a system of its own in the same
interleaved rounds, to see whether the shipped chunk is this machine's best. The CPU's default
causal and band passes are the fused host kernel (``fused: true`` in that table,
``pallas_kernels/cpu_fused.py``, where numba imports); with ``--xla-pass`` tmjax's systems also run with
the XLA passes (``fused: false``) beside it, in the same rounds.

    python bench/cpu_prefill.py --out bench/results
    python bench/cpu_prefill.py --chunks 512,768,1024 --out DIR
    python bench/cpu_prefill.py --xla-pass --breakdown --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

import tmjax
from tmjax import api
from tmjax.checkpoint import tokenizer as load_tokenizer
from tmjax.default_model import smollm2_checkpoint, smollm2_gguf
from tmjax.demo import build_prompt
from tmjax.models import decoder
from tmjax.pallas_kernels import tuning


def torch_model(threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()

    def run(tokens: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(tokens.astype(np.int64)), use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float().numpy()

    return run


@contextlib.contextmanager
def xla_tuning(fields: dict | None) -> Iterator[None]:
    """Within this block, the xla backend's tuning table sets ``fields`` for every call (nothing when None)."""
    if fields is None:
        yield
        return
    shipped = tuning.table
    # The device named, so that it overrides the shipped entry for this device (a later entry of as many keys).
    entry = {"device": tuning.device_key("xla"), "head_dim": "*", "group": "*", "pattern": "*", "tuning": fields}
    tuning.table = lambda backend, part="entries": shipped(backend, part) + (
        (entry,) if backend == "xla" and part == "entries" else ())
    try:
        yield
    finally:
        tuning.table = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="the demo's target (3858 tokens)")
    parser.add_argument("--switch-layer", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--chunks", default=None,
                        help="comma-separated XLA key chunks to time tmjax with (default: the tuning table's)")
    parser.add_argument("--xla-pass", action="store_true",
                        help="also time tmjax with the XLA causal and band passes instead of the fused host kernel")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    chunks = [None] if args.chunks is None else [int(c) for c in args.chunks.split(",")]
    if any(c is not None and (c < 8 or c % 8) for c in chunks):
        parser.error(f"--chunks must be multiples of 8, got {args.chunks}")
    # (name suffix, xla tuning fields over the table's): one pair of tmjax systems each
    variants = [("", None) if c is None else (f" chunk {c}", {"chunk": c}) for c in chunks]
    if args.xla_pass:
        variants.append((" (XLA passes)", {"fused": False}))

    path = smollm2_checkpoint("float32")
    params, tok = tmjax.load(path), load_tokenizer(path)
    text = build_prompt(tok, args.prompt_tokens, depth=0.4, seed=0)[0]
    tokens = np.asarray(tok.encode(text), np.int32)[None]
    n = tokens.shape[1]
    threads = os.cpu_count() or 1

    def tmjax_run(layout, fields: dict | None):
        """``tmjax.prefill``, or with tuning ``fields`` the same program compiled ahead under them (caches
        cleared first, so nothing traced under other fields is reused); the compiled programs then take
        turns without retracing."""
        if fields is None:
            return lambda t: np.asarray(tmjax.prefill(params, t, layout, max_new_tokens=0)[0])
        _, batch, lens, _, cache_size, _ = api._prepare(params, tokens, None, layout, None, 0, minimum=0)
        jax.clear_caches()
        with xla_tuning(fields):
            compiled = jax.jit(lambda p, t, n: api._prefill_logits(p, t, n, layout, None, cache_size, None)[0]
                               ).lower(params, batch, lens).compile()
        return lambda t: np.asarray(compiled(params, batch, lens))  # t is ``tokens``, already in ``batch``

    systems = {}
    for tag, fields in variants:
        systems[f"tmjax dense{tag}"] = tmjax_run(None, fields)
        systems[f"tmjax TriangleMix({args.switch_layer}){tag}"] = tmjax_run(tmjax.TriangleMix(args.switch_layer), fields)
    systems["transformers PyTorch SDPA"] = torch_model(threads)
    if args.breakdown:
        no_attention = jax.jit(lambda p, t: decoder.prefill_hidden(
            p, t, t.shape[1], runs=((0, p.config.num_layers, lambda i, q, k, v, L: q),))[0][:, -1])
        systems["tmjax without attention (identity)"] = lambda t: np.asarray(no_attention(params, t))
        c = params.config
        q = jax.random.normal(jax.random.key(0), (1, n, c.num_heads, c.head_dim))
        k = jax.random.normal(jax.random.key(1), (1, n, c.num_kv_heads, c.head_dim))
        layer = jax.jit(lambda q, k: tmjax.causal_attention(q, k, k))
        systems["one layer's causal attention"] = lambda t: np.asarray(layer(q, k))
    outputs = {name: run(tokens) for name, run in systems.items()}  # warm-up (compiles)
    times = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, run in systems.items():
            t0 = time.perf_counter()
            run(tokens)
            times[name].append(time.perf_counter() - t0)
    torch_s = statistics.median(times["transformers PyTorch SDPA"])
    dense = next(name for name in systems if name.startswith("tmjax dense"))
    agree = float(np.max(np.abs(outputs[dense] - outputs["transformers PyTorch SDPA"])))
    rows = [dict(system=name, median_s=statistics.median(t), times_s=t, vs_pytorch=statistics.median(t) / torch_s)
            for name, t in times.items()]
    meta = dict(machine=f"{platform.node()} ({threads} CPUs)", date=datetime.date.today().isoformat(), jax=jax.__version__,
                prompt_tokens=n, max_abs_logit_difference_dense_vs_pytorch=agree,
                command="python bench/cpu_prefill.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu-prefill-{meta['date']}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"SmolLM2-135M-Instruct float32 prefill, {n} tokens, {meta['machine']}, {meta['date']}, jax {meta['jax']}",
             f"command: `{meta['command']}`; medians of {args.repeats}, systems interleaved; dense vs PyTorch "
             f"max |logit difference| {agree:.1e}", "", "| system | median s | vs PyTorch |", "|---|---|---|"]
    lines += [f"| {r['system']} | {r['median_s']:.2f} | {r['vs_pytorch']:.2f}x |" for r in rows]
    (out / f"cpu-prefill-{meta['date']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
