"""Prompts of different lengths: one batch (each row at its own length) vs one prompt at a time.

Runs ``tmjax.prefill`` and ``tmjax.generate`` (greedy) on a checkpoint for a handful of chat prompts
of mixed lengths, first as one batch, then one by one; every program is compiled by a warm-up call,
so the medians are run times. Also checks that both ways give the same tokens. Writes JSON.

    python bench/batch_lengths.py CKPT --out bench/results/batch-lengths-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import tmjax
from tmjax.checkpoint import tokenizer as load_tokenizer

FILLER = "The grass is green. The sky is blue. "


def _prompts(tokenizer, repeats: list[int]) -> list[np.ndarray]:
    out = []
    for n in repeats:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": FILLER * n + "What colour is the sky?"}], tokenize=False,
            add_generation_prompt=True)
        out.append(np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32))
    return out


def _median_s(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", default="2,10,25,40,60,5,30,50", help="filler repeats per prompt (lengths)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = tmjax.load(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    prompts = _prompts(tokenizer, [int(r) for r in args.repeats.split(",")])
    eos = tokenizer.eos_token_id
    lengths = [int(p.size) for p in prompts]
    batch = np.asarray(tmjax.generate(params, prompts, args.new_tokens, eos_token_id=eos))
    alone = np.stack([np.asarray(tmjax.generate(params, p, args.new_tokens, eos_token_id=eos)) for p in prompts])
    result = {
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "checkpoint": str(args.checkpoint),
        "prompt_lengths": lengths, "new_tokens": args.new_tokens, "runs": args.runs,
        "same_tokens": bool(np.array_equal(batch, alone)),
        "prefill_batch_s": _median_s(lambda: tmjax.prefill(params, prompts)[0], args.runs),
        "prefill_one_by_one_s": sum(_median_s(lambda p=p: tmjax.prefill(params, p)[0], args.runs) for p in prompts),
        "generate_batch_s": _median_s(lambda: tmjax.generate(params, prompts, args.new_tokens), args.runs),
        "generate_one_by_one_s": sum(_median_s(lambda p=p: tmjax.generate(params, p, args.new_tokens), args.runs)
                                     for p in prompts),
    }
    total_new = len(prompts) * args.new_tokens
    result["generate_batch_tokens_per_s"] = total_new / result["generate_batch_s"]
    result["generate_one_by_one_tokens_per_s"] = total_new / result["generate_one_by_one_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
