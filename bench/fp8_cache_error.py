"""Where an fp8 KV cache loses accuracy: the attention error of e4m3 keys and values, per layer, on SmolLM2.

The fp8 cache (``tmjax/models/kv_quant.py``: e4m3, one scale per key / value vector) changed a third of
SmolLM2's greedy answers at 8K. This measures, on the real q/k/v of every layer (dense prefill of the
demo's haystack prompt), the relative L2 error of the last ``--rows`` queries' attention output (what
decode steps compute) when the keys and/or values go through e4m3 under several schemes: per-vector scales
(today's), per-channel scales over groups of 64 positions (KIVI's choice for keys), keys only, values
only, per-vector fp8 with the first ``--keep-first`` and/or last ``--keep-last`` positions kept
exact (the triangle's sinks and window), and smoothed keys (SageAttention's idea: per-vector e4m3 of
``k - m``, ``m`` the keys' mean over positions per KV head and channel, ``m`` added back; the softmax
over keys does not change when one vector is added to every key) alone, with per-vector V, and with
the kept positions; values only with the last kept exact (keys left unquantized); and, for the same
bytes, int8 keys (and values) with one scale ``amax / 127`` per vector, rounded to nearest. float32
throughout; numpy reference attention.

    python bench/fp8_cache_error.py --length 2048 --out bench/results/fp8-cache-error-smollm2-2k-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_capture import capture  # noqa: E402

from tmjax.models import kv_quant  # noqa: E402



def e4m3(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``x`` through e4m3 under ``scale`` (broadcast), back to float32."""
    return np.asarray(jnp.asarray(x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32)) * scale


def per_vector(x: np.ndarray) -> np.ndarray:
    """Today's cache: ``kv_quant``'s per-vector scales, round trip."""
    return np.asarray(kv_quant.dequantize(*kv_quant.quantize(jnp.asarray(x))))


def smoothed(x: np.ndarray) -> np.ndarray:
    """Per-vector e4m3 of ``x`` less its mean over positions (per head and channel), mean added back."""
    mean = x.mean(axis=1, keepdims=True)
    return per_vector(x - mean) + mean


def int8(x: np.ndarray) -> np.ndarray:
    """Per-vector int8 round trip: one scale ``amax / 127`` per vector (1 for an all-zero one)."""
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


def per_channel(x: np.ndarray, group: int = 64) -> np.ndarray:
    out = np.empty_like(x)
    for i in range(0, x.shape[1], group):
        block = x[:, i:i + group]
        out[:, i:i + group] = e4m3(block, np.abs(block).max(1, keepdims=True) / kv_quant.FP8_MAX + 1e-30)
    return out


def attend_last(q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: int) -> np.ndarray:
    """The last ``rows`` queries over every key (GQA by repetition), float32 softmax."""
    group = q.shape[2] // k.shape[2]
    keys, values = np.repeat(k[0], group, 1), np.repeat(v[0], group, 1)
    scores = np.einsum("thd,shd->hts", q[0, -rows:], keys) / np.sqrt(q.shape[-1])
    scores -= scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", weights, values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=64, help="last queries whose attention output is compared")
    parser.add_argument("--keep-first", type=int, default=8)
    parser.add_argument("--keep-last", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for fp8-cache-error.json / .md")
    parser.add_argument("--only", nargs="+", default=None, help="run only the schemes with these exact names")
    args = parser.parse_args()

    first, last = args.keep_first, args.keep_last

    def through(k_round, v_round, first: int = 0, last: int = 0):
        """Keys through ``k_round`` and values through ``v_round`` (None: exact), except the ``first``
        and ``last`` positions, kept exact."""
        def run(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
            out = []
            for exact, round_ in ((k, k_round), (v, v_round)):
                if round_ is None:
                    out.append(exact)
                    continue
                rounded = round_(exact).copy()
                rounded[:, :first] = exact[:, :first]
                rounded[:, exact.shape[1] - last:] = exact[:, exact.shape[1] - last:]
                out.append(rounded)
            return tuple(out)
        return run

    schemes = {
        "K, V per vector (today)": through(per_vector, per_vector),
        "K per channel /64 pos, V per vector": through(per_channel, per_vector),
        "K only, per vector": through(per_vector, None),
        "V only, per vector": through(None, per_vector),
        f"K, V per vector, first {first} exact": through(per_vector, per_vector, first=first),
        f"K, V per vector, last {last} exact": through(per_vector, per_vector, last=last),
        f"K, V per vector, first {first} + last {last} exact": through(per_vector, per_vector, first, last),
        "K smoothed, V per vector": through(smoothed, per_vector),
        "K only, smoothed": through(smoothed, None),
        f"K smoothed, V per vector, last {last} exact": through(smoothed, per_vector, last=last),
        f"K smoothed, V per vector, first {first} + last {last} exact": through(smoothed, per_vector, first, last),
        f"V only, per vector, last {last} exact": through(None, per_vector, last=last),
        "K int8 per vector, V per vector": through(int8, per_vector),
        f"K int8 per vector, V per vector, last {last} exact": through(int8, per_vector, last=last),
        f"K, V int8 per vector, last {last} exact": through(int8, int8, last=last),
        f"K, V int8 per vector, first {first} + last {last} exact": through(int8, int8, first, last),
        f"K int8 per vector, V per vector, first {first} + last {last} exact": through(int8, per_vector, first, last),
    }
    if args.only:
        unknown = set(args.only) - set(schemes)
        if unknown:
            parser.error(f"unknown schemes {sorted(unknown)}; known: {list(schemes)}")
        schemes = {name: schemes[name] for name in args.only}
    rows = []
    for layer, (q, k, v) in sorted(capture(args.length, seed=args.seed).items()):
        reference = attend_last(q, k, v, args.rows)
        row = {"layer": layer}
        for name, scheme in schemes.items():
            k8, v8 = scheme(k, v)
            row[name] = float(np.linalg.norm(attend_last(q, k8, v8, args.rows) - reference) / np.linalg.norm(reference))
        rows.append(row)
    names = list(schemes)
    lines = [f"Relative L2 error of the last {args.rows} queries' attention output, SmolLM2-135M-Instruct, "
             f"{args.length} tokens, per layer (jax {jax.__version__}, {jax.devices()[0].device_kind}; "
             f"`python bench/fp8_cache_error.py {' '.join(sys.argv[1:])}`)", "",
             "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {r['layer']} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |" for r in rows]
    lines.append("| mean | " + " | ".join(f"{np.mean([r[n] for r in rows]):.4f}" for n in names) + " |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp8-cache-error.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        (out / "fp8-cache-error.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
