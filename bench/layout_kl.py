"""How far each layout moves SmolLM2's next-token distribution: last-position KL against dense.

A float32 check of what the bf16 GPU eval cannot separate from rounding: for a few haystack prompts
(``bench/smollm2_capture.haystack_tokens``, seeds 1..N), the KL divergence of the last position's
next-token distribution under each layout from dense's, and whether the argmax stays.

    python bench/layout_kl.py --length 8192 --prompts 2 --out bench/results/dynamic-error-smollm2-8k-cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_capture import haystack_tokens, smollm2  # noqa: E402

import tmjax  # noqa: E402


def layouts(switch: int) -> dict[str, object]:
    return {"dense": None, f"tm:{switch}": tmjax.TriangleMix(switch),
            f"tm:{switch}+vs@0.99": tmjax.TriangleMix(switch, shallow=tmjax.VerticalSlash(mass=0.99)),
            f"tm:{switch}+fp@0.99": tmjax.TriangleMix(switch, shallow=tmjax.FlexPrefill(gamma=0.99)),
            f"tm:{switch}+vs@0.95": tmjax.TriangleMix(switch, shallow=tmjax.VerticalSlash(mass=0.95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--switch-layer", type=int, default=22)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params, tok = smollm2(args.dtype)
    rows = []
    for seed in range(1, args.prompts + 1):
        tokens = haystack_tokens(tok, args.length, seed=seed)
        reference = None
        for name, layout in layouts(args.switch_layer).items():
            logits, _ = tmjax.prefill(params, tokens, layout=layout, max_new_tokens=0)
            logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32).reshape(-1, logits.shape[-1])[-1])
            reference = logp if reference is None else reference
            row = {"seed": seed, "config": name, "kl_vs_dense": float(jnp.sum(jnp.exp(reference) * (reference - logp))),
                   "argmax_same": bool(jnp.argmax(logp) == jnp.argmax(reference))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "dtype": args.dtype, "command": "python bench/layout_kl.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layout-kl.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
