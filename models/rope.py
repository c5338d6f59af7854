"""Rotary position embeddings: inverse frequencies per RoPE type, cos/sin tables, rotation.

The formulas follow transformers' (float32 arithmetic, the half-split ``rotate_half`` layout) so that
a port matches it to float32 rounding. Every type but ``dynamic`` is a trace-time numpy constant;
``dynamic`` depends on the sequence length, which may be a traced scalar (the true prompt length
under bucketing), so it is computed with ``jnp``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tmjax.models.config import ModelConfig, RopeConfig


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a linear blend between."""
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int) -> np.ndarray:
    """YaRN: interpolate (divide by ``factor``) the low frequencies, keep the high ones, ramp between
    the dimensions that rotate ``beta_slow`` and ``beta_fast`` times over the original context."""
    pos_freqs = np.float32(rope.theta) ** _exponents(dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(rope.factor) * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def inverse_frequencies(config: ModelConfig, seq_len: int | jax.Array | None = None) -> jax.Array | np.ndarray:
    """``[head_dim // 2]`` float32 inverse frequencies.

    ``seq_len`` matters only for ``dynamic`` RoPE: the base grows once the sequence is longer than
    ``max_position_embeddings`` (transformers recomputes it for each forward's longest position).
    """
    rope, dim = config.rope, config.head_dim
    if rope.kind == "dynamic":
        max_positions = config.max_position_embeddings
        length = jnp.maximum(jnp.asarray(max_positions if seq_len is None else seq_len, jnp.float32),
                             float(max_positions))
        growth = (rope.factor * length / max_positions) - (rope.factor - 1)
        base = rope.theta * growth ** (dim / (dim - 2))
        return 1.0 / (base ** jnp.asarray(_exponents(dim)))
    if rope.kind == "yarn":
        return _yarn(rope, dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** _exponents(dim))).astype(np.float32)
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        return _llama3(rope, inv_freq)
    return inv_freq


def attention_scaling(rope: RopeConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
    return rope.attention_factor if rope.kind == "yarn" else 1.0


def rope_tables(config: ModelConfig, positions: jax.Array, seq_len: int | jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """float32 ``(cos, sin)`` of shape ``positions.shape + (head_dim,)`` (frequencies repeated twice)."""
    inv_freq = jnp.asarray(inverse_frequencies(config, seq_len), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = attention_scaling(config.rope)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by tables ``[T, D]`` or ``[B, T, D]`` (per row), cast to x's dtype
    first, as transformers does."""
    cos = cos.astype(x.dtype)[..., None, :]
    sin = sin.astype(x.dtype)[..., None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
