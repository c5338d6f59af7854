"""Where the dynamic methods lose accuracy: per-layer attention error on SmolLM2's real q/k/v.

TriangleMix(22) + vertical-slash ``mass`` or FlexPrefill changes 8-17 points more of SmolLM2's greedy
answers at 8K than TriangleMix(22) alone (``bench/results/accuracy-dynamic-H100-20261206/``). This
measures, for every shallow layer (below the switch layer) of a dense prefill of the haystack prompt,
the relative L2 error of each method's attention output against dense causal attention (float32, xla
backend), over all rows and per head, beside the share of causal pairs each method computes. It says
whether the error sits in a few layers or heads (a per-layer exception would fix it) or everywhere (the
estimate itself would have to improve).

    python bench/dynamic_error.py --length 8192 --out bench/results/dynamic-error-smollm2-8k-cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_capture import capture  # noqa: E402

import tmjax  # noqa: E402
from tmjax import attention  # noqa: E402


def methods(gammas: list[float], last_q: int) -> dict[str, object]:
    """Name -> ``VerticalSlash`` / ``FlexPrefill`` pattern (the shipped defaults but for the mass)."""
    out: dict[str, object] = {}
    for g in gammas:
        out[f"vertical-slash mass {g}"] = tmjax.VerticalSlash(mass=g)
        if last_q != 64:
            out[f"vertical-slash mass {g}, last_q {last_q}"] = tmjax.VerticalSlash(mass=g, last_q=last_q)
        out[f"FlexPrefill {g}"] = tmjax.FlexPrefill(gamma=g)
    return out


def attend(pattern, q, k, v) -> np.ndarray:
    if pattern is None:  # dense causal in the inputs' dtype: the rounding floor beside the methods
        return np.asarray(tmjax.causal_attention(q, k, v, implementation="xla"))
    if isinstance(pattern, tmjax.FlexPrefill):
        return np.asarray(tmjax.flexprefill_attention(q, k, v, pattern, implementation="xla"))
    return np.asarray(attention.vertical_slash(q, k, v, pattern, implementation="xla"))


def rel_l2(a: np.ndarray, b: np.ndarray, axes) -> np.ndarray:
    return np.linalg.norm(a - b, axis=axes) / np.linalg.norm(b, axis=axes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--switch-layer", type=int, default=22)
    parser.add_argument("--gammas", default="0.95,0.99")
    parser.add_argument("--last-q", type=int, default=64, help="also vertical-slash with this estimate window")
    parser.add_argument("--dtype", default="float32", help="q/k/v dtype the methods see (the reference: float32)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layers = list(range(args.switch_layer))
    captured = capture(args.length, layers)
    patterns = methods([float(g) for g in args.gammas.split(",")], args.last_q)
    if args.dtype != "float32":
        patterns = {f"dense causal in {args.dtype}": None, **patterns}
    rows = []
    for layer in layers:
        q, k, v = captured[layer]
        dense = np.asarray(tmjax.causal_attention(q, k, v, implementation="xla"))
        q, k, v = (jnp.asarray(x, args.dtype) for x in (q, k, v))
        for name, pattern in patterns.items():
            out = attend(pattern, q, k, v).astype(np.float32)
            per_head = rel_l2(out[0], dense[0], (0, 2))
            row = {"layer": layer, "method": name, "rel_l2": float(rel_l2(out, dense, None)),
                   "rel_l2_last_64": float(rel_l2(out[:, -64:], dense[:, -64:], None)),
                   "rel_l2_per_head": [float(x) for x in per_head]}
            rows.append(row)
            print(json.dumps({k_: row[k_] for k_ in ("layer", "method", "rel_l2")}), flush=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "command": "python bench/dynamic_error.py " + " ".join(sys.argv[1:])}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dynamic-error.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Attention error of the dynamic methods per shallow layer, SmolLM2-135M-Instruct at {args.length}",
             "", f"{meta['device']}, jax {meta['jax']}, {meta['date']}; methods in {args.dtype} against float32 dense, xla; `{meta['command']}`", "",
             "| method | mean rel. L2 (layers 0-%d) | worst layer | worst head (layer) | layers > 2x the mean |"
             % (args.switch_layer - 1), "|---|---|---|---|---|"]
    for name in patterns:
        mine = [r for r in rows if r["method"] == name]
        errs = np.array([r["rel_l2"] for r in mine])
        worst = mine[int(errs.argmax())]
        head_layer = max(mine, key=lambda r: max(r["rel_l2_per_head"]))
        outliers = [r["layer"] for r in mine if r["rel_l2"] > 2 * errs.mean()]
        lines.append(f"| {name} | {errs.mean():.4f} | {worst['rel_l2']:.4f} (layer {worst['layer']}) | "
                     f"{max(head_layer['rel_l2_per_head']):.4f} ({head_layer['layer']}) | {outliers} |")
    lines += ["", "Per layer (rel. L2 over all rows):", "", "| layer | " + " | ".join(patterns) + " |",
              "|---|" + "---|" * len(patterns)]
    for layer in layers:
        cells = [f"{r['rel_l2']:.4f}" for r in rows if r["layer"] == layer]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    (out_dir / "dynamic-error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
