"""The density guard: a dynamic selection that keeps almost every causal key block runs as dense causal.

A sparse table pays for its gathers and per-row bookkeeping; once a head keeps most of its causal key
blocks the dense causal kernel is faster for the same work. The rule (docs/CONTRACTS.md), per sequence
``b`` of length ``L`` and selection head ``h``, over the ``block``-row query blocks ``qb`` that hold
a real row (``qb * block < L``):

    kept fraction = kept / causal, kept = #{(qb, kb): kb <= qb, some real row of qb sees some key of kb},
                    causal = #{(qb, kb): kb <= qb}

A head whose fraction is above ``dense_above`` (``kept > dense_above * causal`` in float32) runs dense causal attention (its table rows become the
full causal lists); when every head of every sequence does, the layer runs the dense causal kernel
instead of the table (``choose``). Thresholds are data: ``tuning.dense_above``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from tmjax.pallas_kernels.tables import Table


def _live(lengths: jax.Array, nq: int, block: int) -> jax.Array:
    """Bool ``[B, 1, nq]``: the query blocks that hold a real row."""
    return ((jnp.arange(nq) * block)[None, :] < lengths[:, None])[:, None, :]


def kept_fraction(kept: jax.Array, lengths: jax.Array, block: int) -> jax.Array:
    """Float32 ``[B, H]`` from ``kept [B, H, nq]``, the key blocks each query block sees (module docstring)."""
    nq = kept.shape[-1]
    live = _live(lengths, nq, block)
    causal = jnp.sum(jnp.where(live, jnp.arange(1, nq + 1), 0), axis=-1)
    return jnp.sum(jnp.where(live, kept, 0), axis=-1) / jnp.maximum(causal, 1).astype(jnp.float32)


def dense_heads(kept: jax.Array, lengths: jax.Array, block: int, dense_above: float) -> jax.Array:
    """Bool ``[B, H]``: the heads whose kept fraction is above ``dense_above``, compared as
    ``kept > dense_above * causal`` (float32; no division to round)."""
    nq = kept.shape[-1]
    live = _live(lengths, nq, block)
    causal = jnp.sum(jnp.where(live, jnp.arange(1, nq + 1), 0), axis=-1).astype(jnp.float32)
    return jnp.sum(jnp.where(live, kept, 0), axis=-1).astype(jnp.float32) > jnp.float32(dense_above) * causal


def all_causal(table: Table, lengths: jax.Array) -> jax.Array:
    """Bool scalar: every real query block of every (sequence, head) lists every key block up to its own
    (a table's lists hold each block once, so a count of ``qb + 1`` is the full causal list); the column
    phase then adds nothing, since every column before the block is covered."""
    nq = table.num_q_blocks
    live = _live(lengths, nq, table.block_q)
    return jnp.all(jnp.where(live, table.num_steps == jnp.arange(1, nq + 1), True))


def choose(table: Table, lengths: jax.Array, sparse: Callable[[], jax.Array], dense: Callable[[], jax.Array]
           ) -> jax.Array:
    """``dense()`` when the table is the full causal one everywhere (``all_causal``), else ``sparse()``:
    both branches are compiled, one runs (``lax.cond``)."""
    return lax.cond(all_causal(table, lengths), dense, sparse)
