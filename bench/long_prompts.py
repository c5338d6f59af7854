"""Long prompts on one GPU (issue 20): prefill time and peak memory at 128K-1M tokens, beside the estimate.

Llama-3.1-8B's shapes with random bf16 weights; per length, ``dense`` (where it fits), ``tm``
(TriangleMix(16)) and ``tm+fp`` / ``tm+vs`` (TriangleMix(16) with FlexPrefill / mass-based
vertical-slash at gamma 0.95 below it; random inputs, so the picks scatter and the guard decides),
with a bf16 cache below ``--fp8-from`` tokens and a one-byte cache (``--one-byte``: ``float8_e4m3fn``, the
default, or ``int8``) from it on.
Every (length, config) row runs in its own subprocess with a timeout, so one out-of-memory or a slow row does not end the run: the row records the error (the
pre-flight's refusal, XLA's OOM, the timeout) instead. A row reports the median of the timed runs
after the first call (which compiles; ``--repeats 0``: the first call only, for rows too long to run
twice), the first call, the device's ``peak_bytes_in_use`` after the
runs (the process's peak: the weights' random init included) and ``tmjax.memory_estimate`` beside it.
The parent stops starting rows when ``--budget-s`` is spent (each remaining row: ``skipped``). The
children run with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` (JAX's default 0.75 leaves a quarter of an
H200 unused). Writes ``long-prompts-<device>-<date>.json`` and ``.md`` under ``--out``.

    python3 bench/long_prompts.py --lengths 131072,262144 --out /tmp/out
    python3 bench/long_prompts.py --lengths 524288,1048576 --configs tm --out /tmp/out
    python3 bench/long_prompts.py --model tiny --lengths 1024,4096 --fp8-from 4096   # CPU dry run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TINY = {  # a CPU dry run of every code path
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 1 << 21, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def _config(name: str) -> dict:
    if name == "tiny":
        return TINY
    from ttft import LLAMA_31_8B  # bench/ is the script's folder

    return LLAMA_31_8B


def _layout(name: str, num_layers: int):
    import tmjax

    switch = min(16, num_layers // 2)
    return {"dense": None, "tm": tmjax.TriangleMix(switch),
            "tm+fp": tmjax.TriangleMix(switch, shallow=tmjax.FlexPrefill(gamma=0.95)),
            "tm+vs": tmjax.TriangleMix(switch, shallow=tmjax.VerticalSlash(mass=0.95))}[name]


def child(args: argparse.Namespace) -> dict:
    """One row, in this process: build the model, prefill ``args.child_length`` tokens, report."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tmjax
    from tmjax.models.config import ModelConfig
    from tmjax.models.params import init_params

    config = ModelConfig.from_hf(_config(args.model))
    n, name = args.child_length, args.child_config
    kv_dtype = args.one_byte if n >= args.fp8_from else None
    layout = _layout(name, config.num_layers)
    row = {"tokens": n, "config": name, "kv_dtype": kv_dtype or "bfloat16", "chunk": args.chunk}
    est = tmjax.memory_estimate(config, n, layout, kv_dtype=kv_dtype, chunk=args.chunk, max_new_tokens=0,
                                implementation=args.implementation)
    row["estimate_gib"] = est.total / 2**30
    row["estimate_parts_gib"] = {k: getattr(est, k) / 2**30 for k in ("weights", "cache", "sequence", "chunk",
                                                                      "attention")}
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    tokens = np.random.default_rng(n).integers(0, config.vocab_size, (1, n), dtype=np.int32)
    started = time.perf_counter()

    def run() -> float:
        t0 = time.perf_counter()
        logits, cache = tmjax.prefill(params, tokens, layout, max_new_tokens=0, implementation=args.implementation,
                                      kv_dtype=kv_dtype, chunk=args.chunk)
        jax.block_until_ready((logits, cache))
        assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
        del logits, cache
        return time.perf_counter() - t0

    row["first_call_s"] = run()
    times = []
    while len(times) < args.repeats and (not times or time.perf_counter() - started + times[-1] < args.row_budget_s):
        times.append(run())
    row["times_s"] = times
    row["median_s"] = statistics.median(times) if times else None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
        row["peak_over_estimate"] = stats["peak_bytes_in_use"] / est.total
    return row


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Long prompts: prefill time and peak memory ({meta['model']})", "",
             f"device: {meta['device']}; date: {meta['date']}; jax {meta['jax']}; command: `{meta['command']}`", "",
             "| tokens | config | cache | median s | first call s | peak GiB | estimate GiB | peak / estimate | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(key: str, fmt: str) -> str:
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        lines.append(f"| {r['tokens']} | {r['config']} | {r.get('kv_dtype', '-')} | {cell('median_s', '{:.2f}')} | "
                     f"{cell('first_call_s', '{:.1f}')} | {cell('peak_gib', '{:.3g}')} | "
                     f"{cell('estimate_gib', '{:.3g}')} | {cell('peak_over_estimate', '{:.2f}')} | "
                     f"{r.get('error', '')[:160]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llama8b", "tiny"], default="llama8b")
    parser.add_argument("--lengths", default="131072,262144,524288,1048576")
    parser.add_argument("--configs", default="dense,tm",
                        help="dense, tm (TriangleMix(16)), tm+fp / tm+vs (with FlexPrefill / mass-based vertical-slash, "
                             "gamma 0.95, below it; random inputs)")
    parser.add_argument("--dense-max", type=int, default=262144,
                        help="longest prompt run dense (dense at 512K takes ~150 s a run: a call of its own)")
    parser.add_argument("--fp8-from", type=int, default=1048576,
                        help="prompts this long or longer use the one-byte cache (--one-byte)")
    parser.add_argument("--one-byte", choices=["float8_e4m3fn", "int8"], default="float8_e4m3fn",
                        help="the one-byte cache's format")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the model's)")
    parser.add_argument("--implementation", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row-timeout-s", type=float, default=300)
    parser.add_argument("--budget-s", type=float, default=500, help="start no row after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--child-length", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-budget-s", type=float, default=240, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_length is not None:
        print("ROW " + json.dumps(child(args)), flush=True)
        return

    started = time.perf_counter()
    rows = []
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
    for n in (int(x) for x in args.lengths.split(",")):
        for name in args.configs.split(","):
            row = {"tokens": n, "config": name}
            left = args.budget_s - (time.perf_counter() - started)
            if name == "dense" and n > args.dense_max:
                row["error"] = f"not run: dense above --dense-max {args.dense_max}"
            elif left <= 30:
                row["error"] = "skipped: --budget-s spent"
            else:
                timeout = min(args.row_timeout_s, left)
                command = [sys.executable, __file__, *sys.argv[1:], "--child-length", str(n), "--child-config", name,
                           "--row-budget-s", str(max(10.0, timeout - 60))]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
                    found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
                    if found:
                        row = json.loads(found[-1][4:])
                    else:
                        tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
                        row["error"] = f"exit {done.returncode}: " + " / ".join(tail)[-600:]
                except subprocess.TimeoutExpired:
                    row["error"] = f"timed out after {timeout:.0f} s"
            rows.append(row)
            print("ROW " + json.dumps(row), flush=True)

    import jax

    device = jax.devices()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    meta = {"device": device.device_kind, "date": stamp, "jax": jax.__version__,
            "model": f"{args.model} shapes (RANDOM weights, bf16)", "command": "python3 " + " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"long-prompts-{device.device_kind.replace(' ', '_')}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base.with_suffix(".md").write_text(render(meta, rows))
    print(render(meta, rows))


if __name__ == "__main__":
    main()
