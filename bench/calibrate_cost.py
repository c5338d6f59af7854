"""Per-prompt time of the calibration loop (``tmjax.calibrate.Divergence``), and what a calibration costs.

For each length: one warm-up prompt (compiles the dense and the TriangleMix prefill and the decode
step; reported as ``first_call_s``), then ``--prompts`` timed prompts, each answered densely once and
under ``TriangleMix(--switch-layer)`` (greedy, following the dense answer as calibration does). Reports
medians; on a shared machine the spread is reported too. Writes JSON under ``--out``.

    python bench/calibrate_cost.py --lengths 2048,8192 --prompts 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax

from tmjax import tasks
from tmjax.calibrate import CALIBRATION_SEED, Divergence
from tmjax.evaluate import load_model
from tmjax.layout import TriangleMix


def time_length(params, tokenizer, max_tokens: int, prompts: int, layout: TriangleMix) -> dict:
    samples = tasks.generate_mixed(tasks.ALL_TASKS, total=prompts + 1, seed=CALIBRATION_SEED, max_tokens=max_tokens,
                                   count=tasks.token_counter(tokenizer))
    divergence = Divergence(params, tokenizer, samples)
    config_s, identical = [], []
    for k in range(prompts + 1):
        started = time.perf_counter()
        same, _ = divergence(layout, k)
        config_s.append(time.perf_counter() - started - divergence.dense_seconds[k])
        identical.append(same)
    dense_s = [divergence.dense_seconds[k] for k in range(1, prompts + 1)]
    timed = config_s[1:]
    return {
        "max_tokens": max_tokens,
        "prompt_tokens": [len(e.prompt_ids) for e in divergence.encoded],
        "tasks": [s.task for s in samples],
        "answer_tokens_dense": [len(divergence.dense[k][1]) for k in range(prompts + 1)],
        "identical": identical,
        "first_call_s": {"dense": divergence.dense_seconds[0], "triangle": config_s[0]},
        "dense_s": dense_s,
        "triangle_s": timed,
        "median_dense_s": statistics.median(dense_s),
        "median_triangle_s": statistics.median(timed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--prompts", type=int, default=4, help="timed prompts per length (after one warm-up)")
    parser.add_argument("--switch-layer", type=int, default=22)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args(argv)
    params, tokenizer, name = load_model(args.checkpoint, args.dtype)
    layout = TriangleMix(args.switch_layer)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows.append(time_length(params, tokenizer, length, args.prompts, layout))
        print(json.dumps({k: rows[-1][k] for k in ("max_tokens", "median_dense_s", "median_triangle_s")}), flush=True)
    device = jax.devices()[0]
    report = {"meta": {"model": name, "dtype": args.dtype, "layout": f"TriangleMix({args.switch_layer})",
                       "device": device.device_kind if device.platform != "cpu" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                       "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                       "command": " ".join(["python", "bench/calibrate_cost.py", *(sys.argv[1:] if argv is None else argv)])},
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.platform == "cpu" else device.device_kind.replace(" ", "_")
    path = out / f"calibrate-cost-smollm2-{tag}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
