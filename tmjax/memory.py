"""Prefill's memory from shapes alone, and the pre-flight check that refuses what cannot fit.

``memory_estimate`` predicts the peak of one ``tmjax.prefill`` (or ``generate``'s prefill) as the
sum of what it holds at once, in bytes (every term is stated in ``MemoryEstimate``):

- ``weights``: every weight, in the weights' dtype;
- ``cache``: ``2 * L * B * S * Hkv * D`` numbers in ``kv_dtype`` (fp8, int8: plus one float32 scale per
  vector, and ``2 * L * B * (min(RECENT, S) + min(SINKS, S)) * Hkv * D`` numbers in ``dtype``, each row's
  last ``kv_quant.RECENT`` and first ``kv_quant.SINKS`` positions exact), ``S`` the cache size (the
  prompt's bucket plus ``max_new_tokens``, rounded up to 128);
- ``sequence``: the full-sequence activations one layer keeps while its attention runs: hidden
  states ``[B, T, H]``, q/k/v ``[B, T, Hq + 2 Hkv, D]`` and the attention's output ``[B, T, Hq, D]``,
  plus the embedding gather that the first layer reads (another ``[B, T, H]``);
- ``chunk``: the per-token stages' working set on one chunk: the MLP's three ``[B, C, I]``
  tensors, its float32 SiLU input, float32 norm and RoPE temporaries;
- ``attention``: the attention's own working set: K and V passed through the value guard (a
  copy each); for vertical-slash layers the float32 estimation scores of the last ``last_q`` rows
  against every key (two ``[B, Hq, last_q, T]`` arrays), for FlexPrefill layers the same with its
  last ``block`` rows (its classification); on the ``xla`` backend, Triangle and
  sliding-window layers' band: its chunk (float32 scores and probabilities, ``band_chunk_scores``
  entries per head each) and its heads-first copies (q, k and v in float32, the output in
  ``dtype``); where the CPU runs the fused host pass (``xla.fused_here``) instead, its buffers: q, k
  and v handed to the callback, k and v padded head-major, the float32 output, its copy into XLA and
  its cast (four q-sized and four k-sized float32 arrays; for Triangle layers also the last rows' K and
  V heads-first and the band's float32 output that the merge reads). The Pallas kernels keep their
  tiles on chip.

``T`` is the padded prompt (``tmjax.api.bucket_length``). The pre-flight (``preflight``) compares
the total with the device's memory (``memory_stats()["bytes_limit"]`` on an accelerator; on CPU the
machine's available RAM plus the weights already held) and raises one ``ValueError`` naming the
need, the memory and the longest prompt that would fit, before anything compiles. Set
``TMJAX_MEMORY_CHECK=0`` to skip it. Weights placed on a mesh of several devices are not checked
(the estimate is for one device).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from tmjax.attention import default_implementation
from tmjax.layout import FlexPrefill, Layout, TriangleMix, VerticalSlash
from tmjax.models import kv_quant, sharding
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes
from tmjax.pallas_kernels import tuning, xla

# The default chunk keeps each of the MLP's [B, chunk, intermediate] tensors at <= 2**26 numbers
# (128 MiB in bf16): Llama-3.1-8B at batch 1 runs 4096-token chunks.
CHUNK_NUMBERS = 1 << 26
MIN_CHUNK = 16
_GIB = 1 << 30


def default_chunk(config: ModelConfig, batch: int = 1) -> int:
    """Tokens per chunk of the per-token stages: the largest power of two whose MLP intermediate
    ``[batch, chunk, intermediate_size]`` stays within ``CHUNK_NUMBERS`` numbers (at least ``MIN_CHUNK``)."""
    fits = CHUNK_NUMBERS // max(1, batch * config.intermediate_size)
    return max(MIN_CHUNK, 1 << max(0, fits.bit_length() - 1))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted prefill peak, in bytes, by part (the module docstring defines each)."""

    weights: int
    cache: int
    sequence: int
    chunk: int
    attention: int
    padded_tokens: int
    chunk_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.sequence + self.chunk + self.attention

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / _GIB:.2f}"
                          for name in ("weights", "cache", "sequence", "chunk", "attention"))
        return f"{self.total / _GIB:.2f} GiB ({parts} GiB)"


def _itemsize(dtype: object) -> int:
    return jnp.dtype(dtype).itemsize


def memory_estimate(
    config: ModelConfig,
    tokens: int,
    layout: Layout | None = None,
    *,
    batch: int = 1,
    dtype: object = jnp.bfloat16,
    kv_dtype: object = None,
    chunk: int | None = None,
    max_new_tokens: int = 256,
    implementation: str | None = None,
) -> MemoryEstimate:
    """The predicted peak memory of prefilling ``batch`` prompts of ``tokens`` tokens under ``layout``
    with weights and activations in ``dtype``, a cache in ``kv_dtype`` (None: ``dtype``) with room
    for ``max_new_tokens``, per-token stages over ``chunk`` tokens (None: ``default_chunk``) and
    attention on ``implementation`` (None: the platform's, ``tmjax.attention.default_implementation``)."""
    from tmjax.api import _ALIGN, bucket_length  # the API's own bucketing (api imports this module)

    c = config
    t = bucket_length(int(tokens))
    size = -(-(t + max_new_tokens) // _ALIGN) * _ALIGN
    a = _itemsize(dtype)
    chunk = min(t, default_chunk(c, batch) if chunk is None else chunk)
    weights = sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(c))) * a
    kv = jnp.dtype(dtype) if kv_dtype is None else jnp.dtype(kv_dtype)
    cache = 2 * c.num_layers * batch * size * c.num_kv_heads * kv_quant.bytes_per_vector(kv, c.head_dim)
    if kv_quant.quantized(kv):  # the ring of recent positions and the sinks, exact, in the activations' dtype
        exact = min(kv_quant.RECENT, size) + min(kv_quant.SINKS, size)
        cache += 2 * c.num_layers * batch * exact * c.num_kv_heads * c.head_dim * a
    q_numbers, kv_numbers = batch * t * c.num_heads * c.head_dim, batch * t * c.num_kv_heads * c.head_dim
    hidden = batch * t * c.hidden_size * a
    sequence = 2 * hidden + (2 * q_numbers + 2 * kv_numbers) * a
    rows = batch * chunk
    per_chunk = rows * (c.intermediate_size * (2 * a + 4) + 3 * c.hidden_size * 4
                        + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * 4)
    attention = 2 * kv_numbers * a
    patterns = [None if layout is None else layout.attention_at(i) for i in range(c.num_layers)]  # None: dense
    # rows whose exact scores the estimation holds at once: vertical-slash's last_q, FlexPrefill's last block
    last_q = max((p.last_q if isinstance(p, VerticalSlash) else p.block for p in patterns
                  if isinstance(p, (VerticalSlash, FlexPrefill))), default=0)
    attention += 2 * batch * c.num_heads * min(last_q, t) * t * 4
    banded = any(isinstance(p, TriangleMix) for p in patterns) or any(
        (c.layer_window(i) or t) < t for i in range(c.num_layers))
    on_xla = (implementation or default_implementation()) == "xla"
    heads = dict(q_heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    if on_xla and (banded or None in patterns) and xla.fused_here(
            tuning.choose(xla, "xla", **heads, pattern="triangle" if banded else "causal")):
        # the fused host pass: q, k, v handed to the callback, k and v padded head-major, its float32
        # output, that output's copy into XLA and its cast
        attention += 4 * (4 * q_numbers + 4 * kv_numbers)
        if banded:  # the triangle's last rows (XLA): K and V heads-first, and the band's output the merge reads
            attention += 4 * (q_numbers + 2 * kv_numbers)
    elif banded and on_xla:
        band = tuning.choose(xla, "xla", **heads, pattern="triangle").band_chunk_scores
        attention += 2 * batch * c.num_heads * band * 4 + (q_numbers + 2 * kv_numbers) * 4 + q_numbers * a
    return MemoryEstimate(weights, cache, sequence, per_chunk, attention, t, chunk)


def device_memory() -> tuple[int, str] | None:
    """(bytes, how they were found) of the first local device, or None when it does not say."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats bytes_limit"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    available = int(info["MemAvailable"].split()[0]) * 1024
    return available, "the machine's available RAM (CPU)"


def longest_fitting(config: ModelConfig, capacity: int, upper: int, **kwargs: object) -> int:
    """The longest prompt of at most ``upper`` tokens whose estimate fits ``capacity`` bytes (0: none)."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if memory_estimate(config, mid, **kwargs).total <= capacity:
            low = mid
        else:
            high = mid - 1
    return low


def check_chunk(chunk: object) -> int | None:
    """``chunk`` checked: None or an int >= 1."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be None (the model's default) or an int >= 1 (tokens per chunk), got {chunk!r}")
    return int(chunk)


def preflight(params: Params, batch: int, longest: int, layout: Layout | None, implementation: str | None,
              max_new_tokens: int, chunk: object, kv_dtype: object) -> tuple[int, str | None]:
    """Check ``chunk`` and ``kv_dtype``, and that prefilling ``batch`` prompts of ``longest`` tokens
    fits the device (``ValueError`` otherwise); returns the chunk to run (the default resolved) and
    the cache dtype's name (None: the weights' dtype)."""
    chunk, kv_dtype = check_chunk(chunk), kv_quant.check_kv_dtype(kv_dtype)
    config = params.config
    run_chunk = default_chunk(config, batch) if chunk is None else chunk
    if os.environ.get("TMJAX_MEMORY_CHECK", "1") == "0" or sharding.params_mesh(params) is not None:
        return run_chunk, kv_dtype
    found = device_memory()
    if found is None:
        return run_chunk, kv_dtype
    capacity, source = found
    dtype = jax.tree.leaves(params.weights)[0].dtype
    kwargs = dict(layout=layout, batch=batch, dtype=dtype, kv_dtype=kv_dtype, chunk=run_chunk,
                  max_new_tokens=max_new_tokens, implementation=implementation)
    need = memory_estimate(config, longest, **kwargs)
    if jax.local_devices()[0].platform == "cpu":  # the weights already sit in the RAM that is not available
        capacity += need.weights
    if need.total <= capacity:
        return run_chunk, kv_dtype
    fits = longest_fitting(config, capacity, longest, **kwargs)
    hint = (f"the longest prompt that fits is {fits} tokens" if fits else "no prompt fits (the weights and cache "
            "alone are too large)")
    raise ValueError(
        f"prefilling {batch} x {longest} tokens needs about {need.describe()} but the device has "
        f"{capacity / _GIB:.2f} GiB ({source}); {hint} at batch {batch}, max_new_tokens {max_new_tokens}, "
        f"kv_dtype {kv_dtype or dtype.name}, chunk {run_chunk} (kv_dtype='int8' or 'float8_e4m3fn' halves a bf16 cache; "
        "TMJAX_MEMORY_CHECK=0 skips this check)")
