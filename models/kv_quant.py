"""An fp8 KV cache: keys and values stored as ``float8_e4m3fn`` with one float32 scale per vector.

Every key and every value vector (one position of one KV head, ``head_dim`` numbers) gets its own
scale ``amax(|x|) * (1 / 448)`` (448 is e4m3's largest finite value), so the vector's largest entry lands on
e4m3's top and a position with large activations costs no precision to the others. An all-zero
vector (the cache's unwritten positions) gets scale 1. Decoding never materialises a dequantized
cache: attention multiplies each key's score by its key scale and each probability by its value
scale (``tmjax.models.decoder``), which equals attending to ``x8 * scale``. The scales cost
``4 / head_dim`` bytes per cached number (3% at head_dim 128), the cache half of bf16's. Beside it a
ring of the last ``RECENT`` positions per row stays exact; decoding reads those positions from the ring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP8 = "float8_e4m3fn"
# An fp8 cache also keeps each row's most recent RECENT positions exact (in the activations' dtype): a
# decode step attends mostly to its neighbours, and e4m3's rounding of their keys is what changes answers
# (bench/results/fp8-cache-error-smollm2-2k-cpu: the last 256 exact cut SmolLM2's attention error 4x).
RECENT = 256
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
# Cache dtypes the API takes: None (the weights' dtype) or one of these names.
KV_DTYPES = ("float32", "bfloat16", "float16", FP8)


def quantized(dtype: object) -> bool:
    """Whether a cache of ``dtype`` keeps scales beside it (fp8)."""
    return dtype is not None and jnp.dtype(dtype) == jnp.dtype(FP8)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., D]`` -> (``float8_e4m3fn [..., D]``, float32 scales ``[...]``) with ``x ~ q * scale``."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax * (1 / FP8_MAX), 1.0)  # a product: XLA would turn a division into one
    return (x32 / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: object = jnp.float32) -> jax.Array:
    """The values ``q [..., D]`` with scales ``[...]`` stand for, in ``dtype``."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def bytes_per_vector(dtype: object, head_dim: int) -> int:
    """Cache bytes of one key (or value) vector of ``head_dim`` numbers, its scale included."""
    return head_dim * jnp.dtype(dtype).itemsize + (4 if quantized(dtype) else 0)


def check_kv_dtype(kv_dtype: object) -> str | None:
    """``kv_dtype`` checked: None or one of ``KV_DTYPES`` (a name or the numpy dtype); returns its name."""
    if kv_dtype is None:
        return None
    try:
        name = np.dtype(kv_dtype).name if not isinstance(kv_dtype, str) else kv_dtype
    except TypeError:
        name = None
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be None (the weights' dtype) or one of {KV_DTYPES}, got {kv_dtype!r}")
    return name
