"""What the Pallas kernels (triton, tpu, mosaic_gpu) share and nothing else needs: the inputs they
take, interpret mode, and the base-2 softmax constant."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
LOG2E = math.log2(math.e)


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, backend: str) -> str | None:
    """Why the Pallas kernels cannot take these inputs (dtype, head_dim), or None when they can."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            return f"{backend} attention supports bfloat16 and float16 inputs; {name} is {x.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return (f"{backend} attention supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]} "
                "(use implementation='xla' for other head dims)")
    return None


def interpret_mode(flag: bool | None = None) -> bool:
    """Run a Pallas kernel in the interpreter: as ``flag`` says, else on CPU or when
    ``TMJAX_PALLAS_INTERPRET=1``."""
    if flag is not None:
        return flag
    return jax.default_backend() == "cpu" or os.environ.get("TMJAX_PALLAS_INTERPRET", "") not in ("", "0")
