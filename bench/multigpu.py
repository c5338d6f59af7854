"""Sharded prefill on several devices: correctness against one device, tensor-parallel scaling, scale-out.

Three steps (``--step``), each writing ``multigpu-<step>.json`` and ``.md`` to ``--out``:

- ``correct``: ``tmjax.generate`` (prefill + 16 greedy tokens) on each supported mesh equals the
  one-device result, for SmolLM2-135M-Instruct (real weights; 3 KV heads, so data-parallel meshes and a
  3-way model axis) and a Llama-3.1-8B-shaped random model, dense and TriangleMix(16).
- ``scale``: time to first token at Llama-3.1-8B shapes for tensor-parallel 1 / 2 / 4 / 8 (as many as
  there are devices), dense, TriangleMix(16) and TriangleMix(16) + vertical-slash; efficiency at N
  devices = TTFT(1) / (N x TTFT(N)).
- ``scaleout``: a Llama-3.1-70B-shaped random model (80 layers, hidden 8192, 64 q / 8 KV heads,
  intermediate 28672) over all devices, dense and TriangleMix(40): TTFT, peak memory per device, ratio.

Weights are drawn on the mesh directly (no device ever holds a full copy). ``--tiny`` shrinks every
model (same head ratios, few layers) so the script can be checked on virtual CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/multigpu.py --tiny --step correct
    bash bench/gpu_check.sh multigpu   # on a lent nvidia-h200-x2/-x4/-x8 (keep NCCL_NVLS_ENABLE=0)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the shared hosts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tmjax  # noqa: E402
from tmjax.models.config import ModelConfig  # noqa: E402
from tmjax.models.params import Params, init_params  # noqa: E402
from tmjax.models.sharding import param_shardings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft import LLAMA_31_8B  # noqa: E402

LLAMA_31_70B = dict(LLAMA_31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8)


def shrink(config: dict) -> dict:
    """The same head ratios and RoPE at a size that runs on CPU."""
    return dict(config, hidden_size=config["num_attention_heads"] * 16, intermediate_size=256, num_hidden_layers=4,
                vocab_size=512, head_dim=16)


def random_params(config: ModelConfig, mesh, dtype) -> Params:
    """Random weights drawn straight into their shards on ``mesh`` (or on one device)."""
    draw = lambda key: init_params(config, key, dtype).weights  # noqa: E731
    shardings = None if mesh is None else param_shardings(config, mesh)
    return Params(config, jax.jit(draw, out_shardings=shardings)(jax.random.key(0)))


def meshes_for(kv_heads: int, devices: int) -> list[tuple[int, int]]:
    """(data, model) shapes up to ``devices`` whose model axis divides the KV heads (never replicated)."""
    shapes = []
    for model in (m for m in (1, 2, 3, 4, 8) if kv_heads % m == 0 and m <= devices):
        for data in (d for d in (1, 2, 4, 8) if d * model <= devices):
            if data * model > 1:
                shapes.append((data, model))
    return shapes


def make_mesh(shape: tuple[int, int]):
    return jax.make_mesh(shape, ("data", "model"), devices=jax.devices()[: shape[0] * shape[1]])


def ttft(params, tokens, layout, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        logits, _ = tmjax.prefill(params, tokens, layout, max_new_tokens=0)
        jax.block_until_ready(logits)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_correct(args) -> list[dict]:
    rows = []
    models = [("llama-3.1-8b shapes (random)", ModelConfig.from_hf(shrink(LLAMA_31_8B) if args.tiny else LLAMA_31_8B), None)]
    if not args.tiny:
        from tmjax.checkpoint import tokenizer as load_tokenizer
        from tmjax.default_model import smollm2_checkpoint

        path = smollm2_checkpoint("bfloat16")
        models.append(("SmolLM2-135M-Instruct", tmjax.load(path).config, path))
        tok = load_tokenizer(path)
    n, batch = (256, 8) if args.tiny else (4096, 8)
    for name, config, path in models:
        rng = np.random.default_rng(0)
        if path is None:
            tokens = rng.integers(0, config.vocab_size, size=(batch, n), dtype=np.int32)
        else:
            from tmjax.demo import build_prompt

            text = build_prompt(tok, n + 64, depth=0.5, seed=1)[0]
            tokens = np.tile(np.asarray(tok.encode(text, add_special_tokens=False)[:n], np.int32), (batch, 1))
        switch = min(16, config.num_layers // 2)
        for layout_name, layout in (("dense", None), (f"TriangleMix({switch})", tmjax.TriangleMix(switch, n_local=64, n_last=32))):
            single = tmjax.load(path) if path else random_params(config, None, jnp.bfloat16)
            expected = np.asarray(tmjax.generate(single, tokens, 16, layout))
            del single
            for shape in meshes_for(config.num_kv_heads, len(jax.devices())):
                mesh = make_mesh(shape)
                params = tmjax.load(path, mesh=mesh) if path else random_params(config, mesh, jnp.bfloat16)
                got = np.asarray(tmjax.generate(params, tokens, 16, layout))
                rows.append(dict(model=name, layout=layout_name, mesh=list(shape), tokens=n, batch=batch,
                                 equal=bool((got == expected).all()), rows_equal=int((got == expected).all(1).sum())))
                print("ROW", json.dumps(rows[-1]), flush=True)
    return rows


def step_scale(args) -> list[dict]:
    config = ModelConfig.from_hf(shrink(LLAMA_31_8B) if args.tiny else LLAMA_31_8B)
    lengths = [512, 1024] if args.tiny else [32768, 131072]
    layouts = {"dense": None, "TriangleMix(16)": tmjax.TriangleMix(16),
               "TriangleMix(16) + vertical-slash": tmjax.TriangleMix(16, shallow=tmjax.VerticalSlash())}
    rows = []
    for ways in (w for w in (1, 2, 4, 8) if w <= len(jax.devices())):
        params = random_params(config, None if ways == 1 else make_mesh((1, ways)), jnp.bfloat16)
        for n in lengths:
            tokens = np.random.default_rng(n).integers(0, config.vocab_size, size=(1, n), dtype=np.int32)
            for name, layout in layouts.items():
                rows.append(dict(model_parallel=ways, tokens=n, layout=name, ttft_s=ttft(params, tokens, layout, args.repeats)))
                print("ROW", json.dumps(rows[-1]), flush=True)
        del params
    for r in rows:
        one = next(x for x in rows if x["model_parallel"] == 1 and x["tokens"] == r["tokens"] and x["layout"] == r["layout"])
        r["efficiency"] = one["ttft_s"] / (r["model_parallel"] * r["ttft_s"])
    return rows


def step_scaleout(args) -> list[dict]:
    config = ModelConfig.from_hf(shrink(LLAMA_31_70B) if args.tiny else LLAMA_31_70B)
    ways = len(jax.devices())
    params = random_params(config, make_mesh((1, ways)), jnp.bfloat16)
    rows = []
    for n in ([512, 1024] if args.tiny else [32768, 131072]):
        tokens = np.random.default_rng(n).integers(0, config.vocab_size, size=(1, n), dtype=np.int32)
        for name, layout in (("dense", None), ("TriangleMix(40)", tmjax.TriangleMix(min(40, config.num_layers // 2)))):
            seconds = ttft(params, tokens, layout, args.repeats)
            peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()) / 2**30
            rows.append(dict(model_parallel=ways, tokens=n, layout=name, ttft_s=seconds, peak_gib_per_device=peak))
            print("ROW", json.dumps(rows[-1]), flush=True)
    for r in rows:
        dense = next(x for x in rows if x["tokens"] == r["tokens"] and x["layout"] == "dense")
        r["vs_dense"] = r["ttft_s"] / dense["ttft_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=("correct", "scale", "scaleout"), required=True)
    parser.add_argument("--tiny", action="store_true", help="shrunken models (checks the script on CPU devices)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    rows = {"correct": step_correct, "scale": step_scale, "scaleout": step_scaleout}[args.step](args)
    meta = dict(devices=len(jax.devices()), device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(),
                jax=jax.__version__, tiny=args.tiny, command="python bench/multigpu.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"multigpu-{args.step}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    keys = list(rows[0]) if rows else []
    lines = [f"multigpu {args.step}: {meta['devices']} x {meta['device']}, {meta['date']}, jax {meta['jax']}"
             + (" (TINY models: a check of the script, not a measurement)" if args.tiny else ""),
             f"command: `{meta['command']}`", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    (out / f"multigpu-{args.step}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
