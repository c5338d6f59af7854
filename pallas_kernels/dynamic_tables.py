"""Dynamic tables, built on device inside ``jit``: a selection (kept columns and diagonals, or kept key
blocks) -> per-query-block work in the kernels' format (``tables.Table``, one row set per sequence and
selection head).

Vertical-slash (``vertical_slash``):

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
block last (the only one that needs the causal mask), stored compactly as offsets (``relative``):
``kb = qb - index[first + step]``, ``index`` holding the descending offset sets of full query blocks
``[0, nq)`` and of a sequence's last, partially real one ``[nq, 2 nq)``. Kept columns that lie before
the query block and outside its key blocks are visited as gathered chunks of 64; a bit mask per chunk
says which of the chunk's columns count (the rest are padding or already covered). Built in
O(B x H x (T/64) x (budget/64)) work.

Key-block lists (``block_lists``, FlexPrefill's query-aware heads): query block ``qb`` of ``block``
rows sees key ``j <= i`` iff ``j // block`` is one of its kept blocks; the lists are the table's rows
as they are (absolute blocks, ascending, so the diagonal block comes last and alone is masked).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tmjax.pallas_kernels import density
from tmjax.pallas_kernels.tables import COLUMN_CHUNK, Table

BLOCK = 64  # the vertical-slash contract's granularity: query rows and keys per block
_WORD = 32  # column bits per int32 word


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


def _column_phase(columns: jax.Array, full: jax.Array, last: jax.Array, use_last: jax.Array, live: jax.Array,
                  lengths: jax.Array, seq_len: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Kept ``columns [B, H, V]`` as a column phase beside key blocks given by offset sets ``full`` /
    ``last`` (``_offset_sets``): the padded columns ``[B, H, Vp]``, chunks per query block, the bits of
    the columns that count (real, before the query block, outside its key blocks) and, for the density
    guard, how many distinct key blocks those columns add per query block."""
    nq = full.shape[-1]
    b, h, v = columns.shape
    qb = jnp.arange(nq)
    padded_v = max(-(-v // COLUMN_CHUNK), 1) * COLUMN_CHUNK  # vertical=0 too: one chunk that never counts
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
    n_chunks = jnp.where(live, -(-jnp.sum(real[:, :, None, :] & before, axis=-1) // COLUMN_CHUNK), 0).astype(jnp.int32)
    words = counts.reshape(b, h, nq, padded_v // _WORD, _WORD).astype(jnp.uint32)
    bits = jnp.sum(words << jnp.arange(_WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    # Columns ascend, and a key block's columns are all counted or none: count each block's first.
    opens = jnp.concatenate([jnp.ones_like(columns[..., :1], bool),
                             columns[..., 1:] // BLOCK != columns[..., :-1] // BLOCK], axis=-1)
    added = jnp.sum(counts & opens[:, :, None, :], axis=-1)
    return columns, n_chunks, jax.lax.bitcast_convert_type(bits, jnp.int32), added


def _last_blocks(lengths: jax.Array, nq: int) -> tuple[jax.Array, jax.Array]:
    """Bool ``[B, 1, nq]``: the sequence's last, partially real query block; the blocks holding a real row."""
    qb = jnp.arange(nq)
    last_block = ((lengths - 1) // BLOCK)[:, None, None]
    partial = (lengths % BLOCK != 0)[:, None, None]
    return partial & (qb == last_block), qb <= last_block


def vertical_slash(columns: jax.Array, diagonals: jax.Array, lengths: jax.Array, seq_len: int,
                   dense_above: float | None = None) -> Table:
    """The table for kept ``columns [B, H, V]`` and ``diagonals [B, H, S]`` (ascending; entries
    ``>= L`` are ignored) of sequences of ``lengths [B]`` padded to ``seq_len`` (a multiple of 64).
    Query blocks wholly at or past a sequence's length visit nothing. With ``dense_above``, a head
    whose kept fraction is above it (``density``) lists every causal key block and no columns."""
    if seq_len % BLOCK:
        raise ValueError(f"seq_len must be a multiple of {BLOCK}, got {seq_len}")
    nq = seq_len // BLOCK
    full, last = _offset_sets(diagonals, lengths, nq)
    use_last, live = _last_blocks(lengths, nq)
    columns, n_chunks, bits, added = _column_phase(columns, full, last, use_last, live, lengths, seq_len)
    max_steps = min(nq, 2 * diagonals.shape[-1])
    if dense_above is not None:
        listed = jnp.where(use_last, jnp.cumsum(last, axis=-1), jnp.cumsum(full, axis=-1))
        dense = density.dense_heads(listed + added, lengths, BLOCK, dense_above)[..., None]  # [B, H, 1]
        full, last = full | dense, last | dense
        n_chunks = jnp.where(dense, 0, n_chunks)
        bits = jnp.where(dense[..., None], 0, bits)
        max_steps = nq
    offsets = jnp.concatenate([_descending(full), _descending(last)], axis=-1)
    up_to = jnp.where(use_last, jnp.cumsum(last, axis=-1), jnp.cumsum(full, axis=-1))  # offsets <= qb
    count = jnp.where(use_last, last.sum(-1, keepdims=True), full.sum(-1, keepdims=True))
    n_steps = jnp.where(live, up_to, 0).astype(jnp.int32)
    first = (count - up_to + jnp.where(use_last, nq, 0)).astype(jnp.int32)
    return Table(
        index=offsets, first=first, num_full=jnp.maximum(n_steps - 1, 0), num_steps=n_steps, columns=columns,
        n_chunks=n_chunks, column_bits=bits, seq_len=seq_len, block_q=BLOCK, block_kv=BLOCK, max_steps=max_steps,
        relative=True,
    )


def _unique_kept(blocks: jax.Array) -> jax.Array:
    """``blocks [B, H, nq, K]`` reduced to the blocks ``0 <= kb <= qb``, ascending, each once, then ``nq``."""
    nq = blocks.shape[2]
    qb = jnp.arange(nq)[None, None, :, None]
    kept = jnp.sort(jnp.where((blocks >= 0) & (blocks <= qb), blocks, nq).astype(jnp.int32), axis=-1)
    repeat = jnp.concatenate([jnp.zeros_like(kept[..., :1], bool), kept[..., 1:] == kept[..., :-1]], axis=-1)
    return jnp.sort(jnp.where(repeat, nq, kept), axis=-1)


def _list_table(kept: jax.Array, lengths: jax.Array, seq_len: int, block: int, dense: jax.Array | None) -> Table:
    """The table of ``_unique_kept`` lists; ``dense [B, H]`` rows become the full causal lists."""
    b, h, nq, width = kept.shape
    qb = jnp.arange(nq)[None, None, :, None]
    if dense is not None:
        if width < nq:
            kept = jnp.pad(kept, ((0, 0), (0, 0), (0, 0), (0, nq - width)), constant_values=nq)
            width = nq
        causal = jnp.where(jnp.arange(width) <= qb, jnp.arange(width), nq)
        kept = jnp.where(dense[:, :, None, None], causal, kept).astype(jnp.int32)
    live = (jnp.arange(nq) * block)[None, None, :] < lengths[:, None, None]  # [B, 1, nq]
    n_steps = jnp.where(live, jnp.sum(kept < nq, axis=-1), 0).astype(jnp.int32)
    n_full = jnp.where(live, jnp.sum(kept < qb, axis=-1), 0).astype(jnp.int32)
    # Steps past a row's count repeat its last listed block, so a pipeline does not fetch again.
    last = jnp.take_along_axis(kept, jnp.maximum(n_steps - 1, 0)[..., None], axis=-1)
    kept = jnp.where(jnp.arange(width) < n_steps[..., None], kept, jnp.where(n_steps[..., None] > 0, last, 0))
    return Table(
        index=kept.reshape(b, h, nq * width), first=jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32) * width, (b, h, nq)),
        num_full=n_full, num_steps=n_steps, seq_len=seq_len, block_q=block, block_kv=block, max_steps=min(width, nq),
    )


def block_lists(blocks: jax.Array, lengths: jax.Array, seq_len: int, block: int, dense_above: float | None = None
                ) -> Table:
    """The table for kept key blocks ``blocks [B, H, nq, K]`` (int32 block indices at granularity
    ``block``, per query block of ``block`` rows; slots holding ``nk = seq_len / block`` or more are
    unused) of sequences of ``lengths [B]`` padded to ``seq_len`` (a multiple of ``block``).

    Query ``i < L`` sees key ``j <= i`` iff ``j // block`` is kept for ``i // block``: blocks before
    the query block are visited whole, the diagonal block (if kept) last with the causal mask, blocks
    after it never. Duplicates count once; query blocks wholly past a sequence's length visit nothing.
    With ``dense_above``, a head whose kept fraction is above it (``density``) lists every causal block.
    """
    if seq_len % block:
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of block ({block})")
    nq = seq_len // block
    if blocks.shape[2] != nq:
        raise ValueError(f"blocks has {blocks.shape[2]} query blocks, expected seq_len / block = {nq}")
    kept = _unique_kept(blocks)
    dense = None if dense_above is None else density.dense_heads(jnp.sum(kept < nq, axis=-1), lengths, block,
                                                                 dense_above)
    return _list_table(kept, lengths, seq_len, block, dense)


def flexprefill(selection, lengths: jax.Array, seq_len: int, block: int, dense_above: float | None = None) -> Table:
    """The table of a ``flexprefill.FlexSelection`` (estimated at granularity ``block``) of sequences of
    ``lengths [B]`` padded to ``seq_len`` (a multiple of 64), in 64-token key-block lists for every head:
    a query-aware head's kept blocks split into 64-token blocks, a vertical-slash head's slash blocks
    (``vertical_slash``'s offset sets, made absolute) with its kept columns as the column phase. Query
    ``i`` sees exactly what ``flexprefill.mask`` says; ``dense_above`` as in ``vertical_slash``."""
    if seq_len % BLOCK or block % BLOCK:
        raise ValueError(f"seq_len ({seq_len}) and block ({block}) must be multiples of {BLOCK}")
    query_aware, blocks, columns, diagonals = selection
    nq, split = seq_len // BLOCK, block // BLOCK
    qb = jnp.arange(nq)
    aware = blocks[:, :, qb // split, :, None] * split + jnp.arange(split)  # [B, H, nq, K, split]
    aware = aware.reshape(*aware.shape[:3], -1)
    full, last = _offset_sets(diagonals, lengths, nq)
    use_last, live = _last_blocks(lengths, nq)
    width = min(nq, 2 * diagonals.shape[-1])
    offsets = jnp.where(use_last[..., None], _descending(last)[:, :, None, :width],
                        _descending(full)[:, :, None, :width])  # [B, H, nq, width]; 0 pads (the diagonal again)
    slash = qb[None, None, :, None] - offsets  # negative: an offset beyond the query block
    width = max(aware.shape[-1], width)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])), constant_values=nq)  # noqa: E731
    kept = _unique_kept(jnp.where(query_aware[:, :, None, None], pad(aware), pad(slash)))
    columns, n_chunks, bits, added = _column_phase(columns, full, last, use_last, live, lengths, seq_len)
    dense = None
    if dense_above is not None:
        dense = density.dense_heads(jnp.sum(kept < nq, axis=-1) + added, lengths, BLOCK, dense_above)
        n_chunks = jnp.where(dense[..., None], 0, n_chunks)
        bits = jnp.where(dense[..., None, None], 0, bits)
    table = _list_table(kept, lengths, seq_len, BLOCK, dense)
    return dataclasses.replace(table, columns=columns, n_chunks=n_chunks, column_bits=bits)
