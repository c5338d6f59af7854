"""One layer, the same q/k/v: the authors' triangle beside ``tmjax.triangle_attention``, both against
float32 dense attention under the triangle mask.

Theirs is the call their ``tri_mix`` makes at and above the switch layer (``modules/tri_mix.py::
tri_mix_forward`` -> ``ops/streaming_kernel.py::tri_shape_kernel``, K/V repeated to the query heads
first, as their attention forward does). Inputs: random bf16 at Llama-3.1-8B heads (32 q / 8 KV,
head_dim 128), q scaled by ``--q-scale`` so each row's softmax is peaked enough for a mask error to
show. Reported: relative L2 over sampled rows of every head (the first rows, rows spread over the
sequence, the dense last rows) for theirs and ours against the float32 reference, and ours against
theirs over the whole output. torch runs first; JAX then starts without preallocating.

    python3 bench/peers/minference_agree.py .carry/minference --length 32768 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import minference_source  # noqa: E402
from minference_table import write_json  # noqa: E402
from minference_ttft import TRIANGLE  # noqa: E402

HQ, HKV, D = 32, 8, 128
TOLERANCE = 1e-2  # bf16 outputs: rounding alone gives ~3e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with the MInference export (minference/, csrc/, COMMIT)")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--q-scale", type=float, default=2.0)
    parser.add_argument("--switch-layer", type=int, default=16)
    parser.add_argument("--implementation", default=None, help="tmjax backend (default: the platform's)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args(argv)
    if args.length < 2 * (TRIANGLE["n_local"] + TRIANGLE["n_last"]):
        parser.error(f"--length must be >= {2 * (TRIANGLE['n_local'] + TRIANGLE['n_last'])} (a window, the last "
                     f"rows and a middle between them), got {args.length}")
    args.source = minference_source.check_folder(args.source)
    return args


def sample_rows(length: int, n_last: int):
    """Rows checked against the float32 reference: the first 64, 384 spread over the middle, the last 2 n_last."""
    import numpy as np

    spread = np.linspace(64, length - 2 * n_last, 384).astype(np.int64)
    return np.unique(np.concatenate([np.arange(64), spread, np.arange(length - 2 * n_last, length)]))


def reference_rows(q, k, v, rows, sizes: dict):
    """Float32 softmax(q k^T / sqrt(D)) v under the triangle mask on ``rows``; q ``[1, Hq, T, D]``,
    k/v ``[1, Hkv, T, D]``; returns ``[Hq, len(rows), D]``."""
    import torch

    length, group = q.shape[2], q.shape[1] // k.shape[1]
    i = torch.as_tensor(rows, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    visible = (j <= i) & ((j < sizes["n_init"]) | (i - j < sizes["n_local"]) | (i >= length - sizes["n_last"]))
    out = []
    for h in range(q.shape[1]):
        s = q[0, h, i[:, 0]].float() @ k[0, h // group].float().T / q.shape[-1] ** 0.5
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        out.append(p @ v[0, h // group].float())
    return torch.stack(out)


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("minference_agree: needs a CUDA GPU (their triangle kernel is Triton)")
    minference_source.load(args.source, None, "not needed for the triangle")
    tri_mix = sys.modules["minference.modules.tri_mix"]
    n = args.length
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g) * args.q_scale
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kwargs = {"layer_idx": args.switch_layer, "attn_forward_config": {"starting_layer": args.switch_layer, **TRIANGLE}}
    t0 = time.perf_counter()
    theirs = tri_mix.tri_mix_forward(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1), kwargs)
    torch.cuda.synchronize()
    their_first_s = time.perf_counter() - t0
    rows = sample_rows(n, TRIANGLE["n_last"])
    ref = reference_rows(q, k, v, rows, TRIANGLE)
    theirs_rows = theirs[0][:, torch.as_tensor(rows, device="cuda")]

    import jax
    import jax.numpy as jnp

    import tmjax

    def to_jax(x):  # [1, H, T, D] torch -> [1, T, H, D] jax bf16 (exact: the values are bf16)
        return jnp.asarray(x.transpose(1, 2).float().cpu().numpy(), dtype=jnp.bfloat16)

    qj, kj, vj = to_jax(q), to_jax(k), to_jax(v)
    ours_fn = jax.jit(lambda q, k, v: tmjax.triangle_attention(q, k, v, implementation=args.implementation, **TRIANGLE))
    ours = torch.from_numpy(jax.device_get(ours_fn(qj, kj, vj).astype(jnp.float32))).cuda().transpose(1, 2)
    result = {
        "length": n, "heads": [HQ, HKV, D], "q_scale": args.q_scale, "triangle": TRIANGLE, "rows_checked": len(rows),
        "theirs": "tri_mix_forward at the switch layer -> tri_shape_kernel (Triton a-shape + einsum last rows)",
        "ours": f"tmjax.triangle_attention(implementation={args.implementation!r}) on {jax.devices()[0].device_kind}",
        "source": minference_source.provenance(args.source), "patches": minference_source.PATCHES,
        "rel_l2_theirs_vs_float32": rel_l2(theirs_rows, ref),
        "rel_l2_ours_vs_float32": rel_l2(ours[0][:, torch.as_tensor(rows, device="cuda")], ref),
        "rel_l2_ours_vs_theirs_all_rows": rel_l2(ours, theirs),
        "their_first_call_s": their_first_s, "tolerance": TOLERANCE, "jax": jax.__version__, "torch": torch.__version__,
    }
    result["agree"] = all(result[k] <= TOLERANCE for k in result if k.startswith("rel_l2"))
    print(json.dumps(result, indent=1))
    print("AGREE" if result["agree"] else f"DISAGREE (tolerance {TOLERANCE})", flush=True)
    write_json(Path(args.out) / "minference-agree.json", result)


if __name__ == "__main__":
    main()
