"""End-to-end time to first token: dense, TriangleMix, vertical-slash and both, one jitted prefill each.

tokens in, last-position logits out; median of >= 3 timed runs after a warm-up. ``--model llama8b``:
Llama-3.1-8B's shapes with random weights (vertical-slash picks then scatter: the worst case);
``--model smollm2``: the real SmolLM2-135M-Instruct on the demo's haystack prompt (beyond its trained
8K positions at these lengths: fine for timing). ``--configs`` names what to run: ``dense``, ``tm``
(TriangleMix(switch)), ``vs`` (vertical-slash in every layer), ``tm+vs`` (TriangleMix(switch,
shallow=vertical-slash)), ``vs-mass`` / ``tm+vs-mass`` (vertical-slash keeping ``--mass`` of the estimated
mass, ``--vertical`` / ``--slash`` its caps), ``fp`` / ``tm+fp`` (the same with FlexPrefill, ``--gamma``; its vertical-slash
caps are ``--vertical`` / ``--slash``). With ``--attention-json`` (the one-layer results of ``bench/vertical_slash.py``
and ``bench/attention.py`` from the same run) the markdown adds a *composed* TTFT: the measured
non-attention time (dense TTFT minus layers x dense attention) plus, per layer, the one-layer time of
what that layer runs. Writes JSON + markdown under --out (default $OUT or bench/results). Run the
Hugging Face peer (`peers.py hf`) on the same GPU, back to back, for the transformers SDPA figures.

    python3 bench/ttft.py --lengths 32768,65536,98304,131072 --repeats 3
    python3 bench/ttft.py --model smollm2 --switch-layer 22 --configs dense,tm,vs,tm+vs --vertical 1000 --slash 6096

*Realistic picks* (``--replay-picks smollm2-vs-indices.npz``, from ``bench/smollm2_vs_indices.py`` at the
same lengths): random Llama weights make vertical-slash pick scattered columns and diagonals (the worst
case); SmolLM2's own layers pick what a trained model picks. Config ``tm+vs-replay`` runs
TriangleMix(switch) whose layers below the switch estimate their picks as usual (the cost stays) but
attend with SmolLM2's picks of layer ``l`` (its 3 KV groups tiled over the model's KV heads), in one
jitted prefill through the decoder; ``tm+vs-decoder`` is the same path with the estimated picks (the
row to compare it with: both skip ``tmjax.prefill``'s bucketing and cache return). ``--tiny-llama N``:
Llama-3.1-8B's attention heads with N layers and a small MLP and vocabulary (CPU dry runs).
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
from tmjax import attention, plan
from tmjax.models import decoder
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


# Decoder layers of each --model (for --rows-json, which builds no model).
LAYERS = {"llama8b": 32, "smollm2": 30}


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


def layouts(args) -> dict:
    """Configuration name -> layout, for the names in ``--configs``."""
    shallow = tmjax.VerticalSlash(vertical=args.vertical, slash=args.slash, selection=args.selection)
    by_mass = tmjax.VerticalSlash(vertical=args.vertical, slash=args.slash, selection=args.selection, mass=args.mass)
    flex = tmjax.FlexPrefill(gamma=args.gamma, vertical=args.vertical, slash=args.slash, selection=args.selection)
    every = {
        "dense": None,
        "tm": tmjax.TriangleMix(args.switch_layer),
        "vs": shallow,
        "tm+vs": tmjax.TriangleMix(args.switch_layer, shallow=shallow),
        "vs-mass": by_mass,
        "tm+vs-mass": tmjax.TriangleMix(args.switch_layer, shallow=by_mass),
        "fp": flex,
        "tm+fp": tmjax.TriangleMix(args.switch_layer, shallow=flex),
    }
    vs = "vertical-slash" if args.selection == "group" else f"vertical-slash ({args.selection} selection)"
    fp = f"FlexPrefill(gamma={args.gamma})"
    vs_mass = f"{vs} mass {args.mass}"
    names = {"dense": "dense", "tm": f"TriangleMix({args.switch_layer})", "vs": vs,
             "tm+vs": f"TriangleMix({args.switch_layer}) + {vs}", "vs-mass": vs_mass,
             "tm+vs-mass": f"TriangleMix({args.switch_layer}) + {vs_mass}", "fp": fp,
             "tm+fp": f"TriangleMix({args.switch_layer}) + {fp}"}
    return {names[c]: every[c] for c in args.configs.split(",") if c in every}


def model(args):
    """(params, token source ``n -> [1, n]`` int32, description)."""
    if args.model == "smollm2":
        from smollm2_capture import haystack_tokens, smollm2  # bench/, the script's folder

        params, tok = smollm2(args.dtype)
        return params, lambda n: haystack_tokens(tok, n), f"SmolLM2-135M-Instruct (real weights, {args.dtype}, haystack prompt)"
    shape = LLAMA_31_8B if not args.tiny_llama else dict(
        LLAMA_31_8B, num_hidden_layers=args.tiny_llama, intermediate_size=512, vocab_size=1024)
    config = ModelConfig.from_hf(shape)
    params = init_params(config, jax.random.key(0), jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    return params, lambda n: rng.integers(0, config.vocab_size, size=(1, n), dtype=np.int32), \
        f"Llama-3.1-8B shapes{f' (tiny: {args.tiny_llama} layers)' if args.tiny_llama else ''} (RANDOM weights, {args.dtype})"


class Replay:
    """A layer's attention that estimates vertical-slash picks (their cost) but attends with recorded
    ones: ``columns`` / ``diagonals`` ``[layers, 1, H, budget]``, indexed by the (traced) layer."""

    def __init__(self, columns: np.ndarray, diagonals: np.ndarray, pattern, implementation: str | None):
        self.columns, self.diagonals, self.pattern, self.implementation = columns, diagonals, pattern, implementation

    def __call__(self, layer, q, k, v, length):
        estimated = attention._select(q, k, self.pattern, length)
        # 0, which XLA cannot prove: the estimation stays in the program
        keep = sum((x[..., :1] < 0).astype(jnp.int32) for x in estimated)
        columns = jnp.asarray(self.columns)[layer] + keep
        diagonals = jnp.asarray(self.diagonals)[layer] + keep
        return attention.attend_picks(q, k, v, columns, diagonals, length, guard=self.pattern.guard,
                                      implementation=self.implementation)


def tiled(picks: np.ndarray, heads: int) -> np.ndarray:
    """``[1, G, budget]`` recorded picks over ``heads`` selection heads (group ``h % G`` for head ``h``)."""
    return picks[:, np.arange(heads) % picks.shape[1]]


def decoder_prefill(params, tokens: np.ndarray, runs, repeats: int) -> dict:
    """Median seconds of one jitted prefill through ``decoder.prefill_hidden`` with ``runs`` (last logits)."""
    fn = jax.jit(lambda p, t: decoder.logits(p, decoder.prefill_hidden(p, t, t.shape[1], runs=runs)[0][:, -1]))
    t0 = time.perf_counter()
    logits = jax.block_until_ready(fn(params, tokens))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(fn(params, tokens))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first,
            "finite": bool(jnp.all(jnp.isfinite(logits)))}


def replay_rows(args, params, tokens: np.ndarray, picks: dict) -> dict:
    """``tm+vs-decoder`` and ``tm+vs-replay`` rows (module docstring), by config name."""
    c, n = params.config, tokens.shape[1]
    shallow = tmjax.VerticalSlash(vertical=args.vertical, slash=args.slash, selection=args.selection)
    estimated = plan.layer_runs(c, tmjax.TriangleMix(args.switch_layer, shallow=shallow), n, args.implementation)
    recorded = sorted(int(key.rsplit("_", 1)[1]) for key in picks if key.startswith(f"columns_{n}_"))
    if not recorded:
        raise ValueError(f"--replay-picks has no picks at length {n}")
    heads = c.num_kv_heads if args.selection == "group" else c.num_heads
    layers = range(args.switch_layer)
    columns, diagonals = (np.stack([tiled(picks[f"{name}_{n}_{recorded[layer % len(recorded)]}"], heads)
                                    for layer in layers]) for name in ("columns", "diagonals"))
    replay = Replay(columns, diagonals, shallow, args.implementation)
    triangle = [r for r in plan.layer_runs(c, tmjax.TriangleMix(args.switch_layer), n, args.implementation)
                if r[0] >= args.switch_layer]
    runs = {"tm+vs-decoder": estimated, "tm+vs-replay": ((0, args.switch_layer, replay), *triangle)}
    return {name: decoder_prefill(params, tokens, runs[name], args.repeats) for name in args.configs.split(",")
            if name in runs}


def composed(rows: list[dict], attention_json: str, num_layers: int, switch_layer: int) -> list[str]:
    """Markdown lines: TTFT composed from the dense run's non-attention time and one-layer times.

    Dense attention per layer is our own causal kernel's time when the attention JSON has it (the dense
    TTFT ran that kernel), else cuDNN's; the triangle is the fastest tmjax mosaic_gpu triangle row."""
    layer: dict[tuple[int, str], float] = {}
    for path in attention_json.split(","):
        for r in json.loads(Path(path).read_text())["rows"]:
            if r.get("ms") is not None:
                key = (r["n"], f"{r['system']} [{r['pattern']}]" if r.get("pattern") else r["system"])
                layer[key] = r["ms"] / 1e3

    def pick(n: int, *needles: str) -> float | None:
        hits = [v for (m, name), v in layer.items() if m == n and all(x in name for x in needles)]
        return min(hits) if hits else None

    lines = ["", "Composed TTFT (s): dense TTFT - layers x dense attention + per-layer one-layer times", "",
             "| tokens | non-attention | dense attention / layer | triangle / layer | vertical-slash (real) / layer "
             "| TriangleMix + vertical-slash, composed | vs dense |", "|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows}):
        dense = next((r["median_s"] for r in rows if r["n"] == n and r["system"] == "tmjax dense"), None)
        dense_layer = pick(n, "tmjax mosaic_gpu causal table") or pick(n, "dense causal (cuDNN)")
        triangle = pick(n, "tmjax mosaic_gpu", "[triangle]")
        vs = layer.get((n, "vertical-slash (real)"))
        if None in (dense, dense_layer, triangle, vs):
            continue
        rest = dense - num_layers * dense_layer
        total = rest + switch_layer * vs + (num_layers - switch_layer) * triangle
        lines.append(f"| {n} | {rest:.2f} | {dense_layer * 1e3:.1f} ms | {triangle * 1e3:.2f} ms | {vs * 1e3:.1f} ms | "
                     f"{total:.2f} | {total / dense:.2f}x |")
    return lines


def render(meta: dict, rows: list[dict]) -> list[str]:
    """The markdown table of a run's rows."""
    lines = [f"TTFT, {meta['model']}, {meta['device']}, {meta['date']}, jax {meta['jax']}",
             f"command: `{meta['command']}`", "", "| system | tokens | median s | vs dense | peak GiB |",
             "|---|---|---|---|---|"]
    for r in rows:
        med = "failed" if r["median_s"] is None else f"{r['median_s']:.3f}"
        ratio = f"{r['ratio_vs_dense']:.2f}x" if "ratio_vs_dense" in r else ""
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['system']} | {r['n']} | {med} | {ratio} | {peak} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama8b", "smollm2"), default="llama8b")
    parser.add_argument("--lengths", default="32768,65536,98304,131072")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-layer", type=int, default=16)
    parser.add_argument("--configs", default="dense,tm")
    parser.add_argument("--vertical", type=int, default=1000)
    parser.add_argument("--slash", type=int, default=6096)
    parser.add_argument("--gamma", type=float, default=0.9, help="FlexPrefill's kept mass (configs fp, tm+fp)")
    parser.add_argument("--mass", type=float, default=0.9, help="vertical-slash's kept mass (configs vs-mass, tm+vs-mass)")
    parser.add_argument("--selection", choices=("group", "head"), default="group",
                        help="vertical-slash selection: per KV group (ours) or per query head (MInference's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--implementation", default=None, help="attention backend (default: platform's)")
    parser.add_argument("--attention-json", default=None, help="one-layer result JSONs (comma-separated) to compose")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--replay-picks", default=None, help="npz of bench/smollm2_vs_indices.py (configs "
                        "tm+vs-replay, tm+vs-decoder)")
    parser.add_argument("--tiny-llama", type=int, default=0, help="Llama heads with this many layers (CPU dry run)")
    parser.add_argument("--rows-json", default=None,
                        help="a finished run's ttft.json: redo only its markdown (and the composition) under --out")
    args = parser.parse_args()
    if args.rows_json:
        saved = json.loads(Path(args.rows_json).read_text())
        lines = render(saved["meta"], saved["rows"])
        if args.attention_json:
            lines += composed(saved["rows"], args.attention_json, LAYERS[args.model], args.switch_layer)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ttft.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return

    params, make_tokens, description = model(args)
    jax.block_until_ready(params)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind}; {description}", flush=True)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        tokens = make_tokens(n)
        for name, lay in layouts(args).items():
            try:
                r = time_prefill(params, tokens, lay, args.repeats, args.implementation)
            except Exception as ex:  # keep the other rows: report what failed
                r = {"median_s": None, "error": repr(ex)[:400]}
            r.update(system=f"tmjax {name}", n=n, peak_gib=peak_gib())
            rows.append(r)
            print("ROW", json.dumps(r), flush=True)
        if args.replay_picks:
            try:
                replayed = replay_rows(args, params, tokens, dict(np.load(args.replay_picks)))
            except Exception as ex:  # keep the other rows: report what failed
                replayed = {"tm+vs-replay": {"median_s": None, "error": repr(ex)[:400]}}
            for name, r in replayed.items():
                r.update(system=f"tmjax {name}", n=n, peak_gib=peak_gib())
                rows.append(r)
                print("ROW", json.dumps(r), flush=True)
    for r in rows:
        d = next((x for x in rows if x["n"] == r["n"] and x["system"] == "tmjax dense"), None)
        if d and d["median_s"] and r["median_s"] and r is not d:
            r["ratio_vs_dense"] = r["median_s"] / d["median_s"]

    stamp = datetime.date.today().isoformat()
    meta = {"device": device.device_kind, "date": stamp, "jax": jax.__version__, "model": description,
            "command": "python3 bench/ttft.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = render(meta, rows)
    if args.attention_json:
        lines += composed(rows, args.attention_json, params.config.num_layers, args.switch_layer)
    (out / "ttft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
