"""Vertical-slash estimation: which columns and diagonals each sequence keeps, on device.

For each sequence ``b`` (true length ``L``) and selection head ``h``, with ``Q_last`` the last
``last_q`` real query rows (all ``L`` rows when ``L < last_q``) at positions ``p_r``:

- ``A = softmax(Q_last K[:L]^T * D**-0.5)`` in float32, causal (row ``r`` sees keys ``j <= p_r``);
- vertical score of column ``j``: ``sum_r A[r, j]``; slash score of diagonal ``s``: ``sum_r A[r, p_r - s]``;
- columns ``0..force_vertical-1`` and diagonals ``0..force_slash-1`` are always kept (within the
  budget); then the best scores fill the budgets ``vertical`` and ``slash``, or, with ``mass=gamma``,
  only as many of them as ``keep`` needs to reach ``gamma`` of the estimated mass (the budgets are
  then caps).

Budgets beyond the sequence are clipped to it: the outputs are ``min(vertical, T)`` and
``min(slash, T)`` wide, since a sequence has at most ``T`` columns and diagonals.

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


def grouped_softmax(q: jax.Array, k: jax.Array, visible: jax.Array) -> jax.Array:
    """``softmax(q k^T * D**-0.5)`` over the ``visible`` keys, float32 ``[B, Hkv, G, R, N]`` for q
    ``[B, R, Hq, D]``, k ``[B, N, Hkv, D]`` (GQA: query head ``h`` reads KV head ``h // G``) and
    ``visible`` bool ``[B, R, N]``; zero where not visible and for rows that see nothing."""
    b, r, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, r, hkv, hq // hkv, d)
    logits = jnp.einsum("brhgd,bthd->bhgrt", qg, k, precision=_HIGHEST, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    visible = visible[:, None, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total == 0, 1.0, total)


def _probabilities(q_last: jax.Array, k: jax.Array, positions: jax.Array, real: jax.Array, group: bool) -> jax.Array:
    """Causal softmax of the last rows over all keys, float32 ``[B, H, R, T]`` (H: KV heads when
    ``group``, else query heads); rows that are not real are zero."""
    b, r, hq, _ = q_last.shape
    visible = (jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]) & real[:, :, None]  # [B, R, T]
    probs = grouped_softmax(q_last, k, visible)
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


def keep(score: jax.Array, forced: jax.Array, budget: int, mass: float | None = None) -> jax.Array:
    """Indices of the entries kept from ``score [..., n]`` (``-inf``: the entry does not exist),
    ``[..., min(budget, n)]`` ascending, slots beyond the kept ones holding ``n``.

    Ranking: the ``forced`` entries (bool ``[..., n]``, existing ones only) first, then the others by
    descending score, ties to the lower index; the first ``min(budget, n)`` existing entries of the
    ranking are candidates. Without ``mass`` every candidate is kept. With ``mass=gamma`` a forced
    candidate is kept, another one iff its score is positive and the summed score of the candidates
    ranked before it is below ``gamma`` times the summed score of all existing entries (float32).
    """
    n = score.shape[-1]
    best, picked = lax.top_k(jnp.where(forced, jnp.inf, score), min(budget, n))
    kept = ~jnp.isneginf(best)
    if mass is not None:
        value = jnp.where(jnp.isneginf(score), 0.0, score)
        own = jnp.take_along_axis(value, picked, axis=-1)
        before = jnp.cumsum(own, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(before[..., :1]), before[..., :-1]], axis=-1)
        total = jnp.sum(value, axis=-1, keepdims=True)
        kept &= jnp.isposinf(best) | ((own > 0) & (before < mass * total))
    return jnp.sort(jnp.where(kept, picked, n), axis=-1).astype(jnp.int32)


def forced_prefix(count: int, lengths: jax.Array, t: int) -> jax.Array:
    """Bool ``[B, 1, T]``: the first ``count`` entries that exist (index below the row's length)."""
    index = jnp.arange(t)[None, None, :]
    return (index < count) & (index < lengths[:, None, None])


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
    mass: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(columns [B, H, min(vertical, T)], diagonals [B, H, min(slash, T)])`` int32, ascending; see
    the module docstring and ``keep``. Slots beyond the kept entries hold ``T``."""
    b, t = q.shape[:2]
    lengths = row_lengths(length, b, t)
    v_score, s_score = scores(q, k, last_q=last_q, length=lengths, selection=selection)
    return (keep(v_score, forced_prefix(force_vertical, lengths, t), vertical, mass),
            keep(s_score, forced_prefix(force_slash, lengths, t), slash, mass))
