"""Dynamic block tables for vertical-slash attention: kept columns and diagonals -> per-query-block work.

The attention rule (the contract every backend follows; 64 is part of it, not a tile size): query
``i`` of a length-``L`` sequence sees key ``j <= i`` iff ``j`` is a kept column, or ``j`` lies in a
64-key block that a kept diagonal ``s`` crosses within ``i``'s 64-row query block, i.e. the block
holds ``r - s`` for a real row ``r < L`` of that query block.

A diagonal ``s = 64a + c`` crosses, in every query block ``qb`` whose 64 rows are real, the key
blocks ``qb - a`` and (when ``c > 0``) ``qb - a - 1``: the crossed blocks depend on ``qb`` only through
their *offset* ``qb - kb``. So a sequence-head's slash blocks are one set of offsets, shared by every
full query block; the last query block, with ``m < 64`` real rows, keeps offset ``a`` only for
``c < m``. Offset 0 (the diagonal block) is always kept, since diagonal 0 always is.

The table lists, per (sequence, selection head, query block), the key blocks to visit, the diagonal
block last (the only one that needs the causal mask), like a static ``BlockTable`` row, but held in
device memory and stored compactly as offsets: ``kb = qb - offsets[first + step]``. Kept columns that
lie before the query block and outside its key blocks are visited as gathered chunks of 64; a bit
mask per chunk says which of the chunk's columns count (the rest are padding or already covered).
Everything is built inside ``jit`` in O(B x H x (T/64) x (budget/64)) work.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

BLOCK = 64  # the contract's slash granularity: query rows and keys per block
_WORD = 32  # column bits per int32 word


class DynamicTable(NamedTuple):
    """Per (sequence b, selection head h, query block qb) work lists; ``nq = T_pad / 64``.

    - ``offsets [B, H, 2 * nq]``: kept block offsets, descending; ``[0, nq)`` for full query blocks,
      ``[nq, 2 nq)`` for a sequence's last, partially real one;
    - ``first``, ``n_steps`` ``[B, H, nq]``: query block ``qb`` visits key blocks
      ``qb - offsets[first + s]`` for ``s < n_steps`` (ascending; the last is ``qb`` itself);
    - ``columns [B, H, Vp]``: kept column positions, ascending, padded to a multiple of 64 with ``T``;
    - ``n_chunks [B, H, nq]``: how many 64-column chunks of ``columns`` query block ``qb`` visits;
    - ``column_bits [B, H, nq, Vp / 32]``: bit ``c`` of word ``w`` set iff column ``32 w + c`` counts
      for ``qb`` (a real column before the block and not in one of its key blocks).

    Query blocks wholly at or past a sequence's length visit nothing.
    """

    offsets: jax.Array
    first: jax.Array
    n_steps: jax.Array
    columns: jax.Array
    n_chunks: jax.Array
    column_bits: jax.Array


def _offset_sets(diagonals: jax.Array, lengths: jax.Array, nq: int) -> tuple[jax.Array, jax.Array]:
    """Bool ``[B, H, nq]`` offset sets for full query blocks and for each sequence's last block."""
    b, h, _ = diagonals.shape
    real = diagonals < lengths[:, None, None]
    a, c = diagonals // BLOCK, diagonals % BLOCK
    last_rows = (lengths % BLOCK)[:, None, None]  # real rows of the last block; 0: it is full
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    near = jnp.minimum(a, nq)  # offsets >= nq never reach a key block; clamp into the spare slot
    far = jnp.minimum(a + 1, nq)

    def mark(near_kept: jax.Array) -> jax.Array:
        hits = jnp.zeros((b, h, nq + 1), jnp.int32).at[bi, hi, near].add(near_kept.astype(jnp.int32))
        hits = hits.at[bi, hi, far].add((real & (c > 0)).astype(jnp.int32))
        return hits[..., :nq] > 0

    return mark(real), mark(real & ((last_rows == 0) | (c < last_rows)))


def _descending(bits: jax.Array) -> jax.Array:
    """The set offsets of ``bits [..., nq]`` in descending order, then ``0`` padding."""
    nq = bits.shape[-1]
    key = jnp.where(bits, nq - jnp.arange(nq), 2 * nq)
    return jnp.maximum(nq - jnp.sort(key, axis=-1), 0).astype(jnp.int32)


def build(columns: jax.Array, diagonals: jax.Array, lengths: jax.Array, seq_len: int) -> DynamicTable:
    """The table for kept ``columns [B, H, V]`` and ``diagonals [B, H, S]`` (ascending; entries
    ``>= L`` are ignored) of sequences of ``lengths [B]`` padded to ``seq_len`` (a multiple of 64)."""
    if seq_len % BLOCK:
        raise ValueError(f"seq_len must be a multiple of {BLOCK}, got {seq_len}")
    nq = seq_len // BLOCK
    b, h, v = columns.shape
    full, last = _offset_sets(diagonals, lengths, nq)
    offsets = jnp.concatenate([_descending(full), _descending(last)], axis=-1)

    qb = jnp.arange(nq)
    last_block = ((lengths - 1) // BLOCK)[:, None, None]  # [B, 1, 1]
    partial = (lengths % BLOCK != 0)[:, None, None]
    use_last = partial & (qb == last_block)  # [B, 1, nq]
    live = qb <= last_block
    up_to = jnp.where(use_last, jnp.cumsum(last, axis=-1), jnp.cumsum(full, axis=-1))  # offsets <= qb
    count = jnp.where(use_last, last.sum(-1, keepdims=True), full.sum(-1, keepdims=True))
    n_steps = jnp.where(live, up_to, 0).astype(jnp.int32)
    first = (count - up_to + jnp.where(use_last, nq, 0)).astype(jnp.int32)

    padded_v = -(-v // BLOCK) * BLOCK
    columns = jnp.pad(columns, ((0, 0), (0, 0), (0, padded_v - v)), constant_values=seq_len).astype(jnp.int32)
    real = columns < lengths[:, None, None]  # [B, H, Vp]
    before = columns[:, :, None, :] < (qb * BLOCK)[None, None, :, None]  # [B, H, nq, Vp]
    offset = jnp.clip(qb[None, None, :, None] - columns[:, :, None, :] // BLOCK, 0, nq - 1)
    covered = jnp.where(
        use_last[..., None],
        jnp.take_along_axis(last[:, :, None, :], offset, axis=-1),
        jnp.take_along_axis(full[:, :, None, :], offset, axis=-1),
    )
    counts = real[:, :, None, :] & before & ~covered
    n_chunks = jnp.where(live, -(-jnp.sum(real[:, :, None, :] & before, axis=-1) // BLOCK), 0).astype(jnp.int32)
    words = counts.reshape(b, h, nq, padded_v // _WORD, _WORD).astype(jnp.uint32)
    bits = jnp.sum(words << jnp.arange(_WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return DynamicTable(offsets, first, n_steps, columns, n_chunks, jax.lax.bitcast_convert_type(bits, jnp.int32))


def chunk_mask(column_bits: jax.Array, chunk: jax.Array) -> jax.Array:
    """Bool ``[..., 64]`` from ``column_bits [..., Vp / 32]``: which columns of 64-column chunk ``chunk``
    count."""
    words = jax.lax.dynamic_slice_in_dim(column_bits, chunk * (BLOCK // _WORD), BLOCK // _WORD, axis=-1)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint32)[..., None] >> jnp.arange(_WORD, dtype=jnp.uint32)
    return (bits & 1).astype(bool).reshape(*words.shape[:-1], BLOCK)


def kv_heads(selection_heads: int, kv_heads_: int) -> jax.Array:
    """The KV head each selection head reads: itself (per-group selection) or its query head's group."""
    return jnp.arange(selection_heads) * kv_heads_ // selection_heads


def gather_columns(x: jax.Array, table: DynamicTable) -> jax.Array:
    """``x [B, T, Hkv, D]`` at every selection head's kept columns: ``[B, H, Vp, D]`` (padding slots
    read position ``T - 1``; the column bits never count them)."""
    b, h = table.columns.shape[:2]
    pos = jnp.minimum(table.columns, x.shape[1] - 1)
    return x[jnp.arange(b)[:, None, None], pos, kv_heads(h, x.shape[2])[None, :, None]]
