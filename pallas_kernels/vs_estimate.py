"""Vertical-slash estimation: which columns and diagonals each sequence keeps, on device.

For each sequence ``b`` (true length ``L``) and selection head ``h``, with ``Q_last`` the last
``last_q`` real query rows (all ``L`` rows when ``L < last_q``) at positions ``p_r``:

- ``A = softmax(Q_last K[:L]^T * D**-0.5)`` in float32, causal (row ``r`` sees keys ``j <= p_r``);
- vertical score of column ``j``: ``sum_r A[r, j]``; slash score of diagonal ``s``: ``sum_r A[r, p_r - s]``;
- columns ``0..force_vertical-1`` and diagonals ``0..force_slash-1`` are always kept (within the
  budget); then the best scores fill the budgets ``vertical`` and ``slash``.

``selection="group"`` sums ``A`` over the query heads of a KV group (the group shares one
selection), ``"head"`` selects per query head. Everything has static shapes and runs inside ``jit``:
the work is O(last_q x T) per head plus two top-k's.

Slash sums use a skew: with ``A`` left-padded by ``R`` zeros to width ``W = T + R``, reading its
flat buffer with row stride ``W + 1`` shifts row ``r`` left by ``r``, which lines up every row's
diagonals in one column (``sum_r A[r, p_r - s]`` becomes a column sum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from tmjax.pallas_kernels.lengths import row_lengths, take_rows

_HIGHEST = lax.Precision.HIGHEST


def _probabilities(q_last: jax.Array, k: jax.Array, positions: jax.Array, real: jax.Array, group: bool) -> jax.Array:
    """Causal softmax of the last rows over all keys, float32 ``[B, H, R, T]`` (H: KV heads when
    ``group``, else query heads); rows that are not real are zero."""
    b, r, hq, d = q_last.shape
    hkv = k.shape[2]
    qg = q_last.reshape(b, r, hkv, hq // hkv, d)
    logits = jnp.einsum("brhgd,bthd->bhgrt", qg, k, precision=_HIGHEST, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    visible = (jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]) & real[:, :, None]  # [B, R, T]
    visible = visible[:, None, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total == 0, 1.0, total)
    if group:
        return probs.sum(axis=2)
    return probs.reshape(b, hq, r, k.shape[1])


def _diagonal_sums(probs: jax.Array, start: jax.Array) -> jax.Array:
    """``out[b, h, s] = sum_r probs[b, h, r, start[b] + r - s]`` for ``s`` in ``[0, T)`` (zero where
    the key would be negative)."""
    b, h, r, t = probs.shape
    width = t + r
    padded = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (r, 0)))  # key j sits at column j + r
    flat = jnp.pad(padded.reshape(b, h, r * width), ((0, 0), (0, 0), (0, r)))
    skewed = flat.reshape(b, h, r, width + 1)[..., :width]  # row r shifted left by r
    columns = skewed.sum(axis=2)  # columns[z] = sum_r probs[r, z + r - r_pad]
    # s -> column start + r_pad - s, read backwards: a slice of the reversed columns from t - 1 - start.
    reversed_cols = jnp.pad(columns[..., ::-1], ((0, 0), (0, 0), (0, t)))
    return jax.vmap(lambda c, s0: lax.dynamic_slice_in_dim(c, t - 1 - s0, t, axis=-1))(reversed_cols, start)


def scores(
    q: jax.Array, k: jax.Array, *, last_q: int, length: int | jax.Array | None, selection: str
) -> tuple[jax.Array, jax.Array]:
    """Float32 vertical and slash scores ``[B, H, T]`` per the module docstring; entries that do not
    exist (column or diagonal ``>= L``) are ``-inf``."""
    b, t = q.shape[:2]
    lengths = row_lengths(length, b, t)
    rows = min(last_q, t)
    start = jnp.clip(lengths - rows, 0, t - rows)  # first estimated row; rows past L are padding
    positions = start[:, None] + jnp.arange(rows)
    real = positions < lengths[:, None]
    probs = _probabilities(take_rows(q, start, rows), k, positions, real, selection == "group")
    exists = jnp.arange(t)[None, None, :] < lengths[:, None, None]
    vertical = jnp.where(exists, probs.sum(axis=2), -jnp.inf)
    slash = jnp.where(exists, _diagonal_sums(probs, start), -jnp.inf)
    return vertical, slash


def _keep_top(score: jax.Array, budget: int, forced: int, lengths: jax.Array) -> jax.Array:
    """Indices of the forced entries and the best-scoring others, ``budget`` per head, ascending;
    slots beyond the entries that exist hold ``T`` (matches no key)."""
    t = score.shape[-1]
    index = jnp.arange(t)
    force = (index[None, None, :] < forced) & (index[None, None, :] < lengths[:, None, None])
    ranked = jnp.where(force, jnp.inf, score)
    best, picked = lax.top_k(ranked, min(budget, t))
    picked = jnp.where(jnp.isneginf(best), t, picked).astype(jnp.int32)
    if budget > t:
        picked = jnp.pad(picked, ((0, 0), (0, 0), (0, budget - t)), constant_values=t)
    return jnp.sort(picked, axis=-1)


def select(
    q: jax.Array,
    k: jax.Array,
    *,
    vertical: int,
    slash: int,
    last_q: int,
    force_vertical: int,
    force_slash: int,
    length: int | jax.Array | None,
    selection: str,
) -> tuple[jax.Array, jax.Array]:
    """``(columns [B, H, vertical], diagonals [B, H, slash])`` int32, ascending; see the module
    docstring. Budgets beyond the entries that exist fill the remaining slots with ``T``."""
    lengths = row_lengths(length, q.shape[0], q.shape[1])
    v_score, s_score = scores(q, k, last_q=last_q, length=lengths, selection=selection)
    return (_keep_top(v_score, vertical, force_vertical, lengths), _keep_top(s_score, slash, force_slash, lengths))
