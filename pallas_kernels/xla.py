"""Blocked attention in plain XLA: the portable backend, O(T) memory for the triangle.

Nothing here builds a ``[T, T]`` matrix. The triangle runs in two parts: a *band* pass where each
block of queries gathers only its sink keys and the block-aligned keys of its local window (masked
token-exactly), then the dense last rows, computed as ``n_last`` queries against all keys with an
online softmax over key chunks and written over the band result. Dense causal attention walks key
chunks up to the diagonal with the same online softmax; a triangle whose sizes leave every row dense
is sent there. GQA stays native: q is viewed as ``[B, T, Hkv, G, D]`` and K/V are never repeated.
Scores, softmax and accumulation are float32; loops stop at ``length``, so padding costs no work.
K and V pass ``_common.guard_values`` once, so a value a row cannot see (padding, a non-finite value
at a masked key) never reaches it, while steps only mask scores.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tmjax.pallas_kernels import dynamic_tables
from tmjax.pallas_kernels._common import guard_values, pad_seq, put_rows, round_up, row_lengths, static_length, take_rows

# Query rows per band block; a band chunk (one loop step) holds as many blocks as keep its score
# tensor under _BAND_CHUNK_SCORES entries per batch row and head (16 blocks for the default layout).
_BAND_BLOCK = 64
_BAND_CHUNK_SCORES = 1 << 20
# Query and key rows per step of the online-softmax passes (causal and the dense last rows). Not a
# power of two: with 256 a step's K/V slices alias in the CPU caches; 192 is 15-25% faster on XLA CPU
# (causal, 9 q / 3 KV heads, head_dim 64, T = 3858 / 4096 / 8192: 151 / 180 / 790 ms vs 203 / 216 / 922).
_CHUNK = 192
# Finite "minus infinity": masked scores never produce inf - inf = nan.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_HIGHEST = lax.Precision.HIGHEST


def _cdiv(a, b):
    return -(-a // b)


def _scores(q: jax.Array, k: jax.Array, subscripts: str) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    return jnp.einsum(subscripts, q, k, precision=_HIGHEST, preferred_element_type=jnp.float32) * scale


def _online_update(carry: tuple, s: jax.Array, visible: jax.Array | None, v: jax.Array, subscripts: str) -> tuple:
    """One online-softmax step: raw scores ``s`` (float32), ``visible`` broadcastable to ``s`` (None:
    every row sees every key, so no mask), values ``v`` (through ``_common.guard_values``) contracted
    by ``subscripts`` (``p, v -> acc``)."""
    peak, total, acc = carry
    if visible is not None:
        s = jnp.where(visible, s, _MASKED)
    new_peak = jnp.maximum(peak, s.max(axis=-1))
    p = jnp.exp(s - new_peak[..., None])
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    rescale = jnp.exp(peak - new_peak)
    acc = acc * rescale[..., None] + jnp.einsum(subscripts, p, v.astype(jnp.float32), precision=_HIGHEST)
    return new_peak, total * rescale + p.sum(axis=-1), acc


def _online_rows(
    q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, n_key_chunks: int | jax.Array, chunk: int,
    n_full: int | jax.Array = 0,
) -> jax.Array:
    """Causal attention of query rows at positions ``q_pos`` over key chunks ``[0, n_key_chunks)``.

    q ``[B, R, Hkv, G, D]``, k/v ``[B, S, Hkv, D]`` with ``S`` a multiple of ``chunk``, ``q_pos``
    ``[B, R]`` (or ``[1, R]`` for every batch row). The first ``n_full`` key chunks must precede every
    row: they run without a mask. Returns the normalised float32 output ``[B, R, Hkv, G, D]``; rows
    that saw no key are zero.
    """
    b, r, hkv, g, d = q.shape

    def step(c, carry, masked):
        kc = lax.dynamic_slice_in_dim(k, c * chunk, chunk, axis=1)
        vc = lax.dynamic_slice_in_dim(v, c * chunk, chunk, axis=1)
        visible = None
        if masked:
            visible = ((c * chunk + jnp.arange(chunk)) <= q_pos[:, :, None])[:, None, None]  # [B, 1, 1, R, chunk]
        return _online_update(carry, _scores(q, kc, "bqhgd,bkhd->bhgqk"), visible, vc, "bhgqk,bkhd->bhgqd")

    init = (
        jnp.full((b, hkv, g, r), _MASKED, jnp.float32),
        jnp.zeros((b, hkv, g, r), jnp.float32),
        jnp.zeros((b, hkv, g, r, d), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, lambda c, carry: step(c, carry, False), init)
    _, total, acc = lax.fori_loop(n_full, n_key_chunks, lambda c, carry: step(c, carry, True), carry)
    out = acc / jnp.where(total == 0, 1.0, total)[..., None]
    return out.transpose(0, 3, 1, 2, 4)


def _band(q: jax.Array, k: jax.Array, v: jax.Array, n_init: int, n_local: int, length: int | jax.Array) -> jax.Array:
    """Sinks + local window for every row; q ``[B, T, Hkv, G, D]``, output in q's dtype.

    Query block ``[s, s + bq)`` gathers keys ``[0, n_init)`` and ``[s - halo, s + bq)``, where the
    halo is the window's reach rounded up to whole blocks; window keys below ``n_init`` are masked
    so that a sink is never counted twice. Chunks wholly at or beyond ``length`` are skipped.
    """
    b, t, hkv, g, d = q.shape
    bq = min(_BAND_BLOCK, round_up(t, 8))
    halo = round_up(n_local - 1, bq)
    n_blocks = _cdiv(t, bq)
    fit = max(1, _BAND_CHUNK_SCORES // (bq * (n_init + halo + bq)))
    # A power of two, so that power-of-two lengths need no padding copy.
    blocks_per_chunk = min(n_blocks, 1 << (fit.bit_length() - 1))
    rows = blocks_per_chunk * bq
    padded = round_up(t, rows)
    qp, kp, vp = (pad_seq(x, padded) for x in (q, k, v))

    # Key positions seen by each query block of a chunk, relative to the chunk's first row.
    block_start = np.arange(blocks_per_chunk)[:, None] * bq
    window = block_start - halo + np.arange(halo + bq)[None, :]
    sinks = np.broadcast_to(np.arange(n_init)[None, :], (blocks_per_chunk, n_init))
    is_sink = np.concatenate([np.ones_like(sinks, bool), np.zeros_like(window, bool)], axis=1)
    row_offset = block_start + np.arange(bq)[None, :]  # [C, bq]

    def chunk(c, out):
        row0 = c * rows
        key_pos = jnp.concatenate([jnp.asarray(sinks), row0 + window], axis=1)  # [C, K]
        query_pos = row0 + row_offset
        i, j = query_pos[:, :, None], key_pos[:, None, :]
        visible = (j <= i) & (jnp.asarray(is_sink)[:, None, :] | ((j >= n_init) & (i - j < n_local)))
        index = jnp.clip(key_pos, 0, padded - 1)
        kc, vc = (jnp.take(x, index, axis=1) for x in (kp, vp))  # [B, C, K, Hkv, D]
        qc = lax.dynamic_slice_in_dim(qp, row0, rows, axis=1).reshape(b, blocks_per_chunk, bq, hkv, g, d)
        mask = visible[None, :, None, None]  # [1, C, 1, 1, bq, K]
        s = jnp.where(mask, _scores(qc, kc, "bcqhgd,bckhd->bchgqk"), _MASKED)
        p = jnp.where(mask, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
        total = p.sum(axis=-1)
        o = jnp.einsum("bchgqk,bckhd->bchgqd", p, vc.astype(jnp.float32), precision=_HIGHEST)
        o = o / jnp.where(total == 0, 1.0, total)[..., None]
        o = o.transpose(0, 1, 4, 2, 3, 5).reshape(b, rows, hkv, g, d)
        return lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), row0, axis=1)

    out = lax.fori_loop(0, _cdiv(length, rows), chunk, jnp.zeros(qp.shape, q.dtype))
    return out[:, :t]


def triangle_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    n_init: int,
    n_local: int,
    n_last: int,
    length: int | jax.Array | None = None,
) -> jax.Array:
    """Triangle attention (see ``tmjax.triangle_attention``) in O(T) memory and work."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    lengths = row_lengths(length, b, t)
    static = static_length(length, t)
    if n_local >= t or n_init >= t or (static is not None and n_last >= static):
        return causal_attention(q, k, v, length=length)  # every visible row is dense
    k, v = guard_values(k, v, lengths)
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    out = _band(qg, k, v, n_init=n_init, n_local=n_local, length=jnp.max(lengths))
    n_dense = min(n_last, t)
    if n_dense:
        start = jnp.clip(lengths - n_last, 0, t - n_dense)  # [B]
        chunk = min(_CHUNK, round_up(t, 8))
        kp, vp = (pad_seq(x, round_up(t, chunk)) for x in (k, v))
        rows = take_rows(qg, start, n_dense)
        q_pos = start[:, None] + jnp.arange(n_dense)
        n_full = jnp.min(start + 1) // chunk  # key chunks before every dense row
        dense = _online_rows(rows, q_pos, kp, vp, _cdiv(jnp.max(start) + n_dense, chunk), chunk, n_full)
        out = put_rows(out, dense.astype(out.dtype), start)
    return out.reshape(b, t, hq, d)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, length: int | jax.Array | None = None
) -> jax.Array:
    """Dense causal attention, one query chunk at a time over key chunks up to its diagonal; query
    chunks past the longest row's length are skipped."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    lengths = row_lengths(length, b, t)
    live = jnp.max(lengths)
    k, v = guard_values(k, v, lengths)
    chunk = min(_CHUNK, round_up(t, 8))
    padded = round_up(t, chunk)
    qp = pad_seq(q.reshape(b, t, hkv, hq // hkv, d), padded)
    kp, vp = (pad_seq(x, padded) for x in (k, v))

    def query_chunk(c, out):
        row0 = c * chunk
        rows = lax.dynamic_slice_in_dim(qp, row0, chunk, axis=1)
        o = _online_rows(rows, (row0 + jnp.arange(chunk))[None], kp, vp, c + 1, chunk, n_full=c)
        return lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), row0, axis=1)

    out = lax.fori_loop(0, _cdiv(live, chunk), query_chunk, jnp.zeros(qp.shape, q.dtype))
    return out[:, :t].reshape(b, t, hq, d)


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    columns: jax.Array,
    diagonals: jax.Array,
    length: int | jax.Array | None = None,
) -> jax.Array:
    """Vertical-slash attention (see ``tmjax.vertical_slash_attention``) following the dynamic table.

    Query blocks are processed a chunk at a time; each chunk loops over its key-block steps and then
    its column chunks (gathered once per call, ``[B, H, V, D]``), with loop counts read from the table,
    so the work follows the kept pattern and memory stays O(T x budget / 64).
    """
    b, t, hq, d = q.shape
    hkv, hsel = k.shape[2], columns.shape[1]
    group = hq // hsel
    lengths = row_lengths(length, b, t)
    k, v = guard_values(k, v, lengths)
    tp = round_up(t, dynamic_tables.BLOCK)
    bq, nq = dynamic_tables.BLOCK, tp // dynamic_tables.BLOCK
    table = dynamic_tables.build(columns, diagonals, lengths, tp)
    kv_head = dynamic_tables.kv_heads(hsel, hkv)
    blocks = max(1, min(nq, _BAND_CHUNK_SCORES // (b * hq * bq * bq)))
    nqp = round_up(nq, blocks)
    qs = pad_seq(q, nqp * bq).reshape(b, nqp, bq, hsel, group, d)
    kp, vp = (pad_seq(x, tp) for x in (k, v))
    per_block = [jnp.pad(x, ((0, 0), (0, 0), (0, nqp - nq))) for x in (table.first, table.n_steps, table.n_chunks)]
    bi = jnp.arange(b)[:, None, None]
    kc, vc = (dynamic_tables.gather_columns(x, table) for x in (kp, vp))  # [B, H, Vp, D]
    bits = jnp.pad(table.column_bits, ((0, 0), (0, 0), (0, nqp - nq), (0, 0)))

    def query_chunk(ci, out):
        qb = ci * blocks + jnp.arange(blocks)
        first, n_steps, n_chunks = (jax.lax.dynamic_slice_in_dim(x, ci * blocks, blocks, axis=2) for x in per_block)
        qc = lax.dynamic_slice_in_dim(qs, ci * blocks, blocks, axis=1)  # [B, C, 64, H, G, D]
        rows = (qb[:, None] * bq + jnp.arange(bq))[None, :, None, None, :, None]  # [1, C, 1, 1, 64, 1]

        def block_step(s, carry):
            live = (s < n_steps).transpose(0, 2, 1)  # [B, C, H]
            slot = jnp.minimum(first + s, 2 * nq - 1)
            kb = jnp.maximum(qb[None, :, None] - jnp.take_along_axis(table.offsets, slot, axis=-1).transpose(0, 2, 1), 0)
            pos = kb[..., None] * bq + jnp.arange(bq)  # [B, C, H, 64]
            keys = kp[bi[..., None], pos, kv_head[None, None, :, None]]  # [B, C, H, 64, D]
            vals = vp[bi[..., None], pos, kv_head[None, None, :, None]]
            scores = _scores(qc, keys, "bcqhgd,bchkd->bchgqk")
            visible = live[..., None, None, None] & (pos[:, :, :, None, None, :] <= rows)
            return _online_update(carry, scores, visible, vals, "bchgqk,bchkd->bchgqd")

        def column_step(c, carry):
            live = (c < n_chunks).transpose(0, 2, 1)
            counts = dynamic_tables.chunk_mask(lax.dynamic_slice_in_dim(bits, ci * blocks, blocks, axis=2), c)
            keys = lax.dynamic_slice_in_dim(kc, c * bq, bq, axis=2)  # [B, H, 64, D]
            vals = lax.dynamic_slice_in_dim(vc, c * bq, bq, axis=2)
            scores = _scores(qc, keys, "bcqhgd,bhkd->bchgqk")
            visible = (live[..., None] & counts.transpose(0, 2, 1, 3))[:, :, :, None, None, :]
            return _online_update(carry, scores, visible, vals, "bchgqk,bhkd->bchgqd")

        shape = (b, blocks, hsel, group, bq)
        carry = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (d,), jnp.float32))
        carry = lax.fori_loop(0, jnp.max(n_steps), block_step, carry)
        _, total, acc = lax.fori_loop(0, jnp.max(n_chunks), column_step, carry)
        o = acc / jnp.where(total == 0, 1.0, total)[..., None]  # [B, C, H, G, 64, D]
        o = o.transpose(0, 1, 4, 2, 3, 5).reshape(b, blocks * bq, hq, d)
        return lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), ci * blocks * bq, axis=1)

    live_chunks = _cdiv(_cdiv(jnp.max(lengths), bq), blocks)
    out = lax.fori_loop(0, live_chunks, query_chunk, jnp.zeros((b, nqp * bq, hq, d), q.dtype))
    return out[:, :t]
