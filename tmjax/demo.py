"""``tmjax demo``: find a fact hidden in a long prompt with SmolLM2-135M-Instruct, dense vs TriangleMix.

Builds a passkey-retrieval prompt (thousands of tokens of filler with one fact at a chosen depth), runs
dense prefill + greedy decoding and TriangleMix prefill + greedy decoding, and prints the answers,
prefill time, decode speed and whether both answers agree. Runs on the CPU (XLA attention) and uses
the GPU when jax has one.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import jax
import numpy as np

# First Triangle layer for SmolLM2-135M-Instruct (30 layers): what `tmjax probe` recommends at 8K
# tokens on an H100 (bench/results/probe-smollm2-8k-h100/probe.json).
DEFAULT_SWITCH_LAYER = 22
# Warm prefill runs whose median is reported: one run alone swings with the machine's other load.
WARM_RUNS = 3

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def build_prompt(tokenizer, target_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """Chat prompt of about ``target_tokens`` tokens hiding a passkey at ``depth`` (0..1); returns
    (prompt text with the chat template applied, passkey)."""
    passkey = str(random.Random(seed).randint(10000, 99999))
    fact = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = "What is the pass key? Answer with the number only."
    filler_tokens = len(tokenizer.encode(FILLER, add_special_tokens=False))
    repeats = max(1, (target_tokens - 60) // filler_tokens)
    before = int(repeats * depth)
    haystack = FILLER * before + fact + FILLER * (repeats - before)
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    messages = [{"role": "user", "content": intro + haystack + "\n\n" + question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, passkey


def _run(params, tokens: np.ndarray, layout, max_new_tokens: int, eos_id: int | None) -> dict:
    """Prefill (the median of ``WARM_RUNS`` runs after a compile run) then greedy decode step by step (timed)."""
    import tmjax

    batch = tokens[None, :]
    t0 = time.perf_counter()
    jax.block_until_ready(tmjax.prefill(params, batch, layout=layout))
    compile_and_run = time.perf_counter() - t0
    times = []
    for _ in range(WARM_RUNS):
        t0 = time.perf_counter()
        logits, cache = tmjax.prefill(params, batch, layout=layout)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    prefill_s = float(np.median(times))

    out = [int(np.argmax(np.asarray(logits[0])))]
    # The first step also compiles decode; the steps after it are timed. Donation updates the cache in place.
    logits, cache = tmjax.decode_step(params, np.asarray(out[-1:], np.int32), cache, donate=True)
    out.append(int(np.argmax(np.asarray(logits[0]))))
    t0 = time.perf_counter()
    while len(out) < max_new_tokens and out[-1] != eos_id:
        logits, cache = tmjax.decode_step(params, np.asarray(out[-1:], np.int32), cache, donate=True)
        out.append(int(np.argmax(np.asarray(logits[0]))))
    decode_s = time.perf_counter() - t0
    steps = len(out) - 2
    return dict(
        tokens=out,
        prefill_s=prefill_s,
        first_call_extra_s=max(compile_and_run - prefill_s, 0.0),  # compilation, give or take noise
        decode_tok_s=steps / decode_s if steps else float("nan"),
    )


def _check_args(args: argparse.Namespace) -> None:
    """Every option checked before the model is converted or loaded (``ValueError`` naming it)."""
    limits = (("--depth", args.depth, 0.0 <= args.depth <= 1.0, "within 0..1"),
              ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 2, "at least 2"),
              ("--prompt-tokens", args.prompt_tokens, args.prompt_tokens >= 200, "at least 200"),
              ("--n-init", args.n_init, args.n_init >= 0, ">= 0"),
              ("--n-local", args.n_local, args.n_local >= 1, ">= 1 (the diagonal)"),
              ("--n-last", args.n_last, args.n_last >= 0, ">= 0"))
    for flag, value, ok, rule in limits:
        if not ok:
            raise ValueError(f"{flag} must be {rule}, got {value}")
    from tmjax.default_model import model_config

    config = model_config(args.dtype)
    layers, positions = config.num_layers, config.max_position_embeddings
    if args.switch_layer is not None and not 0 <= args.switch_layer <= layers:
        raise ValueError(f"--switch-layer must be in 0..{layers} (the model has {layers} layers; {layers} "
                         f"means all dense), got {args.switch_layer}")
    if args.prompt_tokens + args.max_new_tokens > positions:
        raise ValueError(f"--prompt-tokens + --max-new-tokens must be at most the model's {positions} positions "
                         f"(max_position_embeddings), got {args.prompt_tokens} + {args.max_new_tokens}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tmjax demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="approximate prompt length (default 4000)")
    parser.add_argument("--depth", type=float, default=0.4, help="where the fact sits, 0..1 (default 0.4)")
    parser.add_argument("--switch-layer", type=int, default=None,
                        help=f"first Triangle layer (default {DEFAULT_SWITCH_LAYER}, the probe's choice for SmolLM2)")
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--n-last", type=int, default=128)
    parser.add_argument("--n-init", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error (argparse has printed it)
        return int(exit_.code or 0)
    try:
        _check_args(args)
        return _demo(args)
    except (ValueError, OSError) as err:
        print(f"tmjax demo: error: {err}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    import tmjax
    from tmjax.checkpoint import tokenizer as load_tokenizer
    from tmjax.default_model import smollm2_checkpoint

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    path = smollm2_checkpoint(args.dtype)
    params = tmjax.load(path)
    tokenizer = load_tokenizer(path)
    num_layers = params.config.num_layers
    switch = args.switch_layer if args.switch_layer is not None else DEFAULT_SWITCH_LAYER
    layout = tmjax.TriangleMix(switch, n_init=args.n_init, n_local=args.n_local, n_last=args.n_last)
    layout.check_layers(num_layers)

    text, passkey = build_prompt(tokenizer, args.prompt_tokens, args.depth, args.seed)
    tokens = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    print(f"model: SmolLM2-135M-Instruct ({num_layers} layers, {args.dtype}) from {path}")
    print(f"prompt: {len(tokens)} tokens, pass key {passkey} hidden at depth {args.depth:.0%}")
    print(f"TriangleMix: layers {switch}..{num_layers - 1} triangle "
          f"(n_init={args.n_init}, n_local={args.n_local}, n_last={args.n_last})\n")

    results = {}
    for name, lay in (("dense", None), ("TriangleMix", layout)):
        r = _run(params, tokens, lay, args.max_new_tokens, tokenizer.eos_token_id)
        r["answer"] = tokenizer.decode(r["tokens"], skip_special_tokens=True).strip()
        results[name] = r
        print(f"{name:>12}: answer {r['answer']!r}  correct={passkey in r['answer']}  "
              f"prefill {r['prefill_s']:.2f} s (first call +{r['first_call_extra_s']:.1f} s)  decode {r['decode_tok_s']:.1f} tok/s")
    same = results["dense"]["tokens"] == results["TriangleMix"]["tokens"]
    dense_s, tm_s = results["dense"]["prefill_s"], results["TriangleMix"]["prefill_s"]
    print(f"\nTriangleMix answer identical to dense: {same}")
    print(f"warm prefill (median of {WARM_RUNS} runs after compiling): dense {dense_s:.3f} s, TriangleMix {tm_s:.3f} s; "
          f"TriangleMix / dense = {tm_s / dense_s:.2f} (speed-up {dense_s / tm_s:.2f}x)")
    return 0

