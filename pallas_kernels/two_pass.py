"""Triangle attention in two passes, for every backend: the band from a static table, then the dense
last rows, merged in place. The dispatch (``tmjax.attention``) calls ``triangle`` once, with the
backend's passes.

Triangle attention = a band (sinks + local window, causal) that a static table describes over the
padded length, plus the dense last rows ``[length - n_last, length)``, whose position depends on the
true ``length`` (possibly traced, one per row). So:

1. the band pass: the backend runs the table over all rows;
2. the last-rows pass: for each batch row ``b``, the ``R`` rows starting at ``start[b] = length[b] -
   n_last`` (a dynamic slice) against every earlier key, ``start`` given as int32 ``[B]``; GPU
   backends split it over KV chunks and merge the chunks by log-sum-exp (``merge_partials``);
3. a splice: rows in ``[length[b] - n_last, length[b])`` take the last-rows result.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tmjax.pallas_kernels.lengths import pad_seq, put_rows, round_up, take_rows
from tmjax.pallas_kernels.tables import Table

BandPass = Callable[[jax.Array, jax.Array, jax.Array, Table, jax.Array], jax.Array]
RowsPass = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def merge_partials(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Combine attention over disjoint key chunks (axis 0), normalised per chunk.

    ``out`` ``[C, ..., D]`` (float32), ``lse`` ``[C, ...]`` log-sum-exp in base 2 (``-inf`` for a
    chunk with no key). Returns the float32 result over all chunks.
    """
    peak = jnp.max(lse, axis=0)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weight = jnp.exp2(lse - peak)
    total = jnp.sum(weight, axis=0)
    merged = jnp.sum(weight[..., None] * out, axis=0)
    return merged / jnp.where(total == 0, 1.0, total)[..., None]


def triangle(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    table: Table,
    lengths: jax.Array,
    n_last: int,
    *,
    band_pass: BandPass,
    rows_pass: RowsPass,
    rows_block: int,
) -> jax.Array:
    """Triangle attention from a band ``table`` (over ``table.seq_len``, a multiple of ``rows_block``)
    and a backend's two passes; ``lengths`` int32 ``[B]``.

    ``band_pass(q, k, v, table, lengths)`` gets inputs padded to ``table.seq_len``;
    ``rows_pass(q_rows, k, v, start)`` gets ``R`` query rows per batch row (``R`` = ``min(n_last, T)``
    rounded up to ``rows_block``) whose first row sits at position ``start[b]`` and returns their
    attention over all keys ``<= row``, ``[B, R, Hq, D]``.
    """
    seq_len, padded = q.shape[1], table.seq_len
    qp, kp, vp = (pad_seq(x, padded) for x in (q, k, v))
    out = band_pass(qp, kp, vp, table, lengths)
    if n_last > 0:
        # XLA's GPU dynamic-slice fusion rejects a kernel's result as the direct target of the
        # in-place update below (seen with jax 0.11.2); the barrier keeps it a plain buffer.
        out = jax.lax.optimization_barrier(out)
        rows = round_up(min(n_last, seq_len), rows_block)
        start = jnp.clip(lengths - n_last, 0, padded - rows).astype(jnp.int32)  # [B]
        last = rows_pass(take_rows(qp, start, rows), kp, vp, start).astype(out.dtype)
        if seq_len - n_last > padded - rows:
            # start is clipped below length - n_last for the longest lengths: the rows written
            # before the dense ones must keep the band result.
            dense = (start[:, None] + jnp.arange(rows)) >= (lengths - n_last)[:, None]
            last = jnp.where(dense[:, :, None, None], last, take_rows(out, start, rows))
        # Otherwise every written row is dense or at/after its length (unspecified): plain in-place
        # updates, which XLA does not turn into a copy of the whole output.
        out = put_rows(out, last, start)
    return out[:, :seq_len]
