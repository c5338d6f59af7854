"""A one-byte KV cache: keys and values stored as ``float8_e4m3fn`` or ``int8`` with one float32 scale
per vector.

Every key and every value vector (one position of one KV head, ``head_dim`` numbers) gets its own
scale ``amax(|x|) / top``, ``top`` the format's largest value (e4m3: 448; int8: 127, entries rounded
to the nearest integer), so the vector's largest entry lands on the format's top and a position with
large activations costs no precision to the others. An all-zero vector (the cache's unwritten
positions) gets scale 1. The two formats cost the same bytes; int8 keeps ~7 significant bits of a
vector's large entries (the ones that carry its scores) where e4m3 keeps 4, so it rounds the scores
less (``bench/results/fp8-cache-error-smollm2-2k-cpu``: 0.42% attention error with the ring vs 1.15%). Decoding never materialises a dequantized
cache: attention multiplies each key's score by its key scale and each probability by its value
scale (``tmjax.models.decoder``), which equals attending to ``x8 * scale``. The scales cost
``4 / head_dim`` bytes per cached number (3% at head_dim 128), the cache half of bf16's. Beside it a
ring of the last ``RECENT`` positions and the first ``SINKS`` positions of each row stay exact; decoding
reads those positions from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP8 = "float8_e4m3fn"
INT8 = "int8"
# A one-byte cache also keeps each row's most recent RECENT positions exact (in the activations' dtype): a
# decode step attends mostly to its neighbours, and e4m3's rounding of their keys is what changes answers
# (bench/results/fp8-cache-error-smollm2-2k-cpu: the last 256 exact cut SmolLM2's attention error 4x).
RECENT = 256
# It also keeps each row's first SINKS positions exact: the attention sinks, small keys that draw much of the
# attention, so their rounding matters. Beside the ring they nearly halve the error again (the same record:
# int8 keys, e4m3 values and the ring 0.57%, with the first 8 exact too 0.31%; e4m3 keys and values 1.15% -> 0.72%).
SINKS = 8
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
INT8_MAX = 127.0  # symmetric: -128 is never used, so q and -q are both representable
# The largest stored value of each quantized format: a vector's amax maps onto it.
TOP = {FP8: FP8_MAX, INT8: INT8_MAX}
# Cache dtypes the API takes: None (the weights' dtype) or one of these names.
KV_DTYPES = ("float32", "bfloat16", "float16", FP8, INT8)


def quantized(dtype: object) -> bool:
    """Whether a cache of ``dtype`` keeps scales beside it (fp8 or int8)."""
    return dtype is not None and jnp.dtype(dtype).name in TOP


def quantize(x: jax.Array, dtype: object = FP8) -> tuple[jax.Array, jax.Array]:
    """``x [..., D]`` -> (``dtype [..., D]``, float32 scales ``[...]``) with ``x ~ q * scale``; ``dtype``
    one of the quantized formats (``TOP``)."""
    name = jnp.dtype(dtype).name
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax * (1 / TOP[name]), 1.0)  # a product: XLA would turn a division into one
    scaled = x32 / scale[..., None]
    if name == INT8:
        scaled = jnp.clip(jnp.round(scaled), -INT8_MAX, INT8_MAX)
    return scaled.astype(name), scale


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
