"""Peak memory of ``tmjax convert`` on a synthetic sharded Llama checkpoint (random weights).

Builds a TinyLlama-1.1B-shaped checkpoint (about 2.2 GB in bfloat16, several shards + index) in a
temporary folder, converts it in a child process and reads the child's peak RSS from
``getrusage(RUSAGE_CHILDREN)``. The target is ``peak <= 1.5 * checkpoint size + 1 GiB``. Writes JSON
+ markdown under --out (default bench/results).

    python3 bench/convert_memory.py [--dtype bfloat16] [--shard-mib 500]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

GIB = 2**30
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a Llama config."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def build_checkpoint(folder: Path, config: dict, shard_bytes: int, dtype: np.dtype) -> int:
    """Write random shards of at most ``shard_bytes`` plus the index; returns the total tensor bytes.
    Only one shard is in memory at a time."""
    rng = np.random.default_rng(0)
    weight_map, shard, shard_size, total, files = {}, {}, 0, 0, []

    def flush() -> None:
        nonlocal shard, shard_size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_size = {}, 0

    for name, shape in tensor_shapes(config).items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shard and shard_size + nbytes > shard_bytes:
            flush()
        shard[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
        shard_size += nbytes
        total += nbytes
    flush()
    (folder / "config.json").write_text(json.dumps(config))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the synthetic source and of the conversion")
    parser.add_argument("--shard-mib", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    dtype = np.dtype(ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32)
    with tempfile.TemporaryDirectory(prefix="tmjax-convert-memory-") as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "out"
        src.mkdir()
        t0 = time.perf_counter()
        size = build_checkpoint(src, TINYLLAMA, args.shard_mib * 2**20, dtype)
        shards = len(list(src.glob("*.safetensors")))
        print(f"built {shards} shards, {size / GIB:.2f} GiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "convert", str(src), str(dst),
                               "--dtype", args.dtype, "--quiet"], env={**os.environ, "JAX_PLATFORMS": "cpu"})
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"conversion failed with exit code {proc.returncode}")
        written = sum(f.stat().st_size for f in (dst / "weights").rglob("*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    budget = 1.5 * size + GIB
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "TinyLlama-1.1B shapes, random weights", "dtype": args.dtype, "shards": shards,
        "checkpoint_bytes": size, "written_bytes": written, "peak_rss_bytes": peak,
        "budget_bytes": int(budget), "within_budget": peak <= budget, "convert_seconds": round(seconds, 1),
        "peak_over_size": round(peak / size, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "convert_memory.md").write_text(
        "# `tmjax convert` peak memory\n\n"
        f"Synthetic sharded checkpoint ({result['model']}), {shards} shards, {args.dtype} -> {args.dtype}, "
        f"measured {result['date']} on CPU.\n\n"
        "| checkpoint | peak RSS | peak / size | budget (1.5 x size + 1 GiB) | within | time |\n"
        "|---|---|---|---|---|---|\n"
        f"| {size / GIB:.2f} GiB | {peak / GIB:.2f} GiB | {peak / size:.2f} | {budget / GIB:.2f} GiB | "
        f"{'yes' if peak <= budget else 'NO'} | {seconds:.0f} s |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
