"""Element-wise masks and dense float32 attention: the reference every kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def triangle_mask(seq_len: int, n_init: int, n_local: int, n_last: int) -> np.ndarray:
    """Bool ``[seq_len, seq_len]``: ``mask[i, j]`` is True where query ``i`` sees key ``j``.

    Written straight from the definition, O(T^2): for tests and small T only.
    """
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    causal = j <= i
    visible = (j < n_init) | (i - j < n_local) | (i >= seq_len - n_last)
    return causal & visible


def causal_mask(seq_len: int) -> np.ndarray:
    """Bool ``[seq_len, seq_len]`` lower-triangular mask."""
    return np.tril(np.ones((seq_len, seq_len), dtype=bool))


def vertical_slash_mask(seq_len: int, length: int, columns, diagonals, block: int = 64) -> np.ndarray:
    """Bool ``[seq_len, seq_len]`` vertical-slash mask of one sequence and head, straight from the
    contract (``tmjax.pallas_kernels.dynamic_tables``): query ``i < length`` sees key ``j <= i`` iff
    ``j`` is a kept column, or ``j``'s ``block``-key block holds ``r - s`` for a kept diagonal ``s``
    and a real row ``r`` of ``i``'s ``block``-row query block. Rows at or past ``length`` see nothing.
    O(T^2): for tests and small T only.
    """
    mask = np.zeros((seq_len, seq_len), dtype=bool)
    rows = np.arange(length)
    cols = np.asarray([c for c in np.asarray(columns).tolist() if c < length], dtype=np.int64)
    mask[rows[:, None], cols[None, :]] = cols[None, :] <= rows[:, None]
    diags = np.asarray([d for d in np.asarray(diagonals).tolist() if d < length], dtype=np.int64)
    for q0 in range(0, length, block):
        real_rows = np.arange(q0, min(q0 + block, length))
        keys = (real_rows[:, None] - diags[None, :]).reshape(-1)
        for kb in np.unique(keys[keys >= 0] // block):
            key_range = np.arange(kb * block, min((kb + 1) * block, seq_len))
            mask[real_rows[:, None], key_range[None, :]] |= key_range[None, :] <= real_rows[:, None]
    return mask


def block_density(mask: np.ndarray, length: int, block: int = 64) -> tuple[int, int]:
    """The density guard's ``(kept, causal)`` of one sequence and head, straight from its rule
    (``tmjax.pallas_kernels.density``): over the ``block``-row query blocks holding a real row, the
    causal (query block, key block) pairs in which some row sees some key of ``mask [T, T]``, and all of them."""
    t = mask.shape[0]
    n = -(-t // block)
    padded = np.zeros((n * block, n * block), bool)
    padded[:t, :t] = mask
    seen = padded.reshape(n, block, n, block).any(axis=(1, 3))
    causal = np.tril(np.ones((n, n), bool)) & (np.arange(n) * block < length)[:, None]
    return int(seen[causal].sum()), int(causal.sum())


def guarded_mask(mask: np.ndarray, length: int, dense_above: float, block: int = 64) -> np.ndarray:
    """``mask`` (one sequence and head, rows past ``length`` empty) under the density guard: above
    ``dense_above`` (``kept > dense_above * causal`` of ``block_density``, in float32) every real row
    sees every earlier key. O(T^2), for tests."""
    kept, causal = block_density(mask, length, block)
    if not np.float32(kept) > np.float32(dense_above) * np.float32(causal):
        return mask
    out = causal_mask(mask.shape[0])
    out[length:] = False
    return out


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | np.ndarray) -> jax.Array:
    """Dense attention in float32 with an explicit bool mask ``[T, S]`` (every sequence and head) or
    ``[B, Hq, T, S]`` (one per sequence and query head); GQA by repeating K/V.

    q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``; returns ``[B, T, Hq, D]`` in q's dtype. Rows with no
    visible key return zeros.
    """
    hq, hkv = q.shape[2], k.shape[2]
    group = hq // hkv
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=jax.lax.Precision.HIGHEST)
    scores = scores / np.sqrt(q.shape[-1])
    mask = jnp.asarray(mask)
    mask = mask[None, None] if mask.ndim == 2 else mask
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhts,bshd->bthd", probs, vf, precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
