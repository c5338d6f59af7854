"""End-to-end time to first token for a model with Llama-3.1-8B's shapes (random weights).

tokens in, last-position logits out, one jitted prefill; median of >= 3 timed runs after a warm-up;
dense vs TriangleMix(switch 16) at each length. Writes JSON + markdown under --out (default $OUT or
bench/results). Run the Hugging Face peer (`peers.py hf`) on the same GPU, back to back, for the
transformers SDPA figures.

    python3 bench/ttft.py --lengths 32768,65536,98304,131072 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tmjax
from tmjax.models.config import ModelConfig
from tmjax.models.params import init_params

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def time_prefill(params, tokens: np.ndarray, layout, repeats: int, implementation: str | None) -> dict:
    t0 = time.perf_counter()
    logits, cache = tmjax.prefill(params, tokens, layout=layout, max_new_tokens=0, implementation=implementation)
    jax.block_until_ready(logits)
    first = time.perf_counter() - t0
    del cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = tmjax.prefill(params, tokens, layout=layout, max_new_tokens=0, implementation=implementation)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
        del cache
    return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first,
            "finite": bool(jnp.all(jnp.isfinite(logits)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536,98304,131072")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-layer", type=int, default=16)
    parser.add_argument("--implementation", default=None, help="triangle backend (default: platform's)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()

    config = ModelConfig.from_hf(LLAMA_31_8B)
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    jax.block_until_ready(params)
    layout = tmjax.TriangleMix(args.switch_layer)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind}; Llama-3.1-8B shapes, RANDOM weights (bf16)", flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for n in [int(x) for x in args.lengths.split(",")]:
        tokens = rng.integers(0, config.vocab_size, size=(1, n), dtype=np.int32)
        for name, lay in (("dense", None), (f"TriangleMix({args.switch_layer})", layout)):
            try:
                r = time_prefill(params, tokens, lay, args.repeats, args.implementation)
            except Exception as ex:  # keep the other rows: report what failed
                r = {"median_s": None, "error": repr(ex)[:400]}
            r.update(system=f"tmjax {name}", n=n, peak_gib=peak_gib())
            rows.append(r)
            print("ROW", json.dumps(r), flush=True)
    for n in sorted({r["n"] for r in rows}):
        d = next(r for r in rows if r["n"] == n and r["system"] == "tmjax dense")
        t = next(r for r in rows if r["n"] == n and r["system"] != "tmjax dense")
        if d["median_s"] and t["median_s"]:
            t["ratio_vs_dense"] = t["median_s"] / d["median_s"]

    stamp = datetime.date.today().isoformat()
    meta = {"device": device.device_kind, "date": stamp, "jax": jax.__version__, "weights": "random",
            "model": "Llama-3.1-8B shapes", "command": "python3 bench/ttft.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"TTFT, {meta['model']} ({meta['weights']} weights), {meta['device']}, {stamp}, jax {meta['jax']}",
             f"command: `{meta['command']}`", "", "| system | tokens | median s | vs dense | peak GiB |",
             "|---|---|---|---|---|"]
    for r in rows:
        med = "failed" if r["median_s"] is None else f"{r['median_s']:.3f}"
        ratio = f"{r['ratio_vs_dense']:.2f}x" if "ratio_vs_dense" in r else ""
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['system']} | {r['n']} | {med} | {ratio} | {peak} |")
    (out / "ttft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
