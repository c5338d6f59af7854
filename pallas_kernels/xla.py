"""Blocked attention in plain XLA: the portable backend, O(T) memory for the triangle.

Nothing here builds a ``[T, T]`` matrix. ``attend`` runs a table (``tables.Table``): a static band
table by its rule, each block of queries gathering its sink keys and the block-aligned keys of its
local window at once (masked token-exactly; the same keys the table lists, fetched as one window
rather than block by block); a static causal table as key chunks up to the diagonal with an online
softmax; a dynamic table by its lists (key blocks, then gathered columns). ``last_rows`` is the
triangle's dense last rows (the dispatch's two-pass driver splices them). GQA stays native: q is
viewed as ``[B, T, Hkv, G, D]`` and K/V are never repeated. Scores, softmax and accumulation are
float32; loops stop at ``length``, so padding costs no work. With ``Tuning.fused`` (the CPU table's
default) the causal and band passes on a one-device CPU host are one fused kernel (``cpu_fused``, numba). K and V come through
``guards.guard_values`` (the dispatch, ``GUARD_VALUES``), so a value a row cannot see never reaches
it while steps only mask scores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tmjax.pallas_kernels import cpu_fused, tables
from tmjax.pallas_kernels.guards import GUARDS
from tmjax.pallas_kernels.lengths import pad_seq, round_up
from tmjax.pallas_kernels.tables import Table

GUARD_VALUES = True  # steps use V as it is: the dispatch passes K and V through guards.guard_values first


@dataclasses.dataclass(frozen=True)
class Tuning:
    """``band_block`` query rows per band block (the static table's block); a band chunk (one loop
    step) holds as many blocks as keep its score tensor under ``band_chunk_scores`` entries per batch
    row and head; the causal pass takes ``query_chunk`` query rows at a time against key steps of
    ``chunk`` rows (rounded down to whole query chunks); the dense last rows take key steps of
    ``chunk`` rows. ``fused`` (the CPU table sets it): the causal and band passes run ``cpu_fused``'s kernel
    (host only, one CPU device, where ``cpu_fused.available()``) with ``fused_block_q`` query rows per
    head against ``fused_block_kv`` keys a step. ``guard``: when the dispatch passes K and V through
    ``guards.guard_values`` (``guards.guarded``: "always", or "nonfinite": only when V holds a non-finite
    entry). Measured values: ``tuning_tables/xla.json``."""

    band_block: int = 64
    band_chunk_scores: int = 1 << 20
    chunk: int = 512
    query_chunk: int = 128
    fused: bool = False
    fused_block_q: int = 32
    fused_block_kv: int = 128
    guard: str = "nonfinite"

    def __post_init__(self) -> None:
        if self.guard not in GUARDS:
            raise ValueError(f"guard must be one of {GUARDS}, got {self.guard!r}")


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Every floating dtype and head_dim runs here."""
    return None


def block_sizes(q_heads: int, kv_heads: int, tuning: Tuning) -> tuple[int, int, int]:
    """(block_q, block_kv, rows_block) of the static tables and the last-rows pass."""
    return tuning.band_block, tuning.band_block, 1
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
    every row sees every key, so no mask), values ``v`` (through ``guards.guard_values``) contracted
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


def _heads_first(x: jax.Array, rows: int) -> jax.Array:
    """``[B, T, Hkv, (G,) D]`` padded to ``rows`` positions, as float32 ``[B, Hkv, rows * G, D]``."""
    x = pad_seq(x, rows).astype(jnp.float32)
    x = x.reshape(x.shape[:3] + (-1, x.shape[-1])).transpose(0, 2, 1, 3, 4)
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _online_step(carry: tuple, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | None) -> tuple:
    """One online-softmax step of heads-first rows: q ``[B, H, M, D]`` (scaled), k/v ``[B, H, N, D]``
    float32, ``visible`` broadcastable to ``[B, H, M, N]`` or None (every row sees every key). Every
    row must have seen a key by its first step's end, so that a masked score's weight
    ``exp(_MASKED - peak)`` is exactly 0 and needs no second mask."""
    peak, total, acc = carry
    s = lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1))), precision=_HIGHEST)
    if visible is not None:
        s = jnp.where(visible, s, _MASKED)
    new_peak = jnp.maximum(peak, s.max(axis=-1))
    p = jnp.exp(s - new_peak[..., None])
    rescale = jnp.exp(peak - new_peak)
    pv = lax.dot_general(p, v, (((3,), (2,)), ((0, 1), (0, 1))), precision=_HIGHEST)
    return new_peak, total * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv


def _init(q: jax.Array) -> tuple:
    b, h, m, d = q.shape
    return (jnp.full((b, h, m), _MASKED, jnp.float32), jnp.zeros((b, h, m), jnp.float32),
            jnp.zeros((b, h, m, d), jnp.float32))


def _finish(carry: tuple) -> jax.Array:
    _, total, acc = carry
    return acc / jnp.where(total == 0, 1.0, total)[..., None]


def _scaled(q: jax.Array) -> jax.Array:
    return q * q.shape[-1] ** -0.5


def _keys(k: jax.Array, v: jax.Array, start: int | jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    return tuple(lax.dynamic_slice_in_dim(x, start, size, axis=2) for x in (k, v))


def _band(q: jax.Array, k: jax.Array, v: jax.Array, n_init: int, n_local: int, length: int | jax.Array,
          tuning: Tuning) -> jax.Array:
    """Sinks + local window for every row; q ``[B, T, Hkv, G, D]``, output in q's dtype.

    Query block ``[s, s + bq)`` gathers keys ``[0, n_init)`` and ``[s - halo, s + bq)``, where the
    halo is the window's reach rounded up to whole blocks; window keys below ``n_init`` are masked
    so that a sink is never counted twice. Heads first, like the causal pass: a chunk of blocks is
    one batched product per side. Every row sees itself, so a masked weight is exactly 0 with one
    mask. Chunks wholly at or beyond ``length`` are skipped.
    """
    b, t, hkv, g, d = q.shape
    bq = min(tuning.band_block, round_up(t, 8))
    halo = round_up(n_local - 1, bq)
    n_blocks = _cdiv(t, bq)
    fit = max(1, tuning.band_chunk_scores // (bq * (n_init + halo + bq)))
    # A power of two, so that power-of-two lengths need no padding copy.
    blocks_per_chunk = min(n_blocks, 1 << (fit.bit_length() - 1))
    rows = blocks_per_chunk * bq
    padded = round_up(t, rows)
    qh = _scaled(_heads_first(q, padded))
    kh, vh = (_heads_first(x, padded) for x in (k, v))

    # Key positions seen by each query block of a chunk, relative to the chunk's first row.
    block_start = np.arange(blocks_per_chunk)[:, None] * bq
    window = block_start - halo + np.arange(halo + bq)[None, :]
    sinks = np.broadcast_to(np.arange(n_init)[None, :], (blocks_per_chunk, n_init))
    is_sink = np.concatenate([np.ones_like(sinks, bool), np.zeros_like(window, bool)], axis=1)
    row_offset = np.repeat(block_start + np.arange(bq)[None, :], g, axis=1)  # [C, bq * G]: row r * G + g

    def chunk(c, out):
        row0 = c * rows
        key_pos = jnp.concatenate([jnp.asarray(sinks), row0 + window], axis=1)  # [C, K]
        i, j = (row0 + row_offset)[:, :, None], key_pos[:, None, :]
        visible = (j <= i) & (jnp.asarray(is_sink)[:, None, :] | ((j >= n_init) & (i - j < n_local)))
        index = jnp.clip(key_pos, 0, padded - 1)
        kc, vc = (jnp.take(x, index, axis=2) for x in (kh, vh))  # [B, Hkv, C, K, D]
        qc = lax.dynamic_slice_in_dim(qh, row0 * g, rows * g, axis=2).reshape(b, hkv, blocks_per_chunk, bq * g, d)
        s = lax.dot_general(qc, kc, (((4,), (4,)), ((0, 1, 2), (0, 1, 2))), precision=_HIGHEST)
        s = jnp.where(visible, s, _MASKED)
        p = jnp.exp(s - s.max(axis=-1, keepdims=True))
        o = lax.dot_general(p, vc, (((4,), (3,)), ((0, 1, 2), (0, 1, 2))), precision=_HIGHEST)
        o = o / p.sum(axis=-1)[..., None]
        return lax.dynamic_update_slice_in_dim(out, o.reshape(b, hkv, rows * g, d).astype(out.dtype), row0 * g, axis=2)

    out = lax.fori_loop(0, _cdiv(length, rows), chunk, jnp.zeros(qh.shape, q.dtype))
    return out.reshape(b, hkv, padded, g, d).transpose(0, 2, 1, 3, 4)[:, :t]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, length: jax.Array, tuning: Tuning) -> jax.Array:
    """Run ``table`` over q ``[B, T, Hq, D]`` and k/v ``[B, T, Hkv, D]`` (``T = table.seq_len``),
    ``length`` int32 ``[B]``: a static table by its rule (band or causal), a dynamic one by its lists."""
    if table.dynamic:
        return _dynamic(q, k, v, table, length, tuning)
    b, t, hq, d = q.shape
    qg = q.reshape(b, t, k.shape[2], hq // k.shape[2], d)
    if table.n_local is None or table.n_local >= t or table.n_init >= t:  # every key of a row's past is seen
        out = _causal(qg, k, v, jnp.max(length), tuning)
    elif fused_here(tuning):
        out = _fused(qg, k, v, jnp.max(length), tuning, n_init=table.n_init, n_local=table.n_local)
    else:
        out = _band(qg, k, v, n_init=table.n_init, n_local=table.n_local, length=jnp.max(length), tuning=tuning)
    return out.reshape(b, t, hq, d)


def last_rows(q_rows: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, tuning: Tuning) -> jax.Array:
    """The triangle's dense last rows: ``R`` query rows per batch row from position ``start[b]``
    (int32 ``[B]``) against every key up to each row, ``[B, R, Hq, D]`` float32. Key chunks before
    every row run without a mask."""
    b, r, hq, d = q_rows.shape
    t, hkv = k.shape[1], k.shape[2]
    chunk = min(tuning.chunk, round_up(t, 8))
    kh, vh = (_heads_first(x, round_up(t, chunk)) for x in (k, v))
    qh = _scaled(_heads_first(q_rows.reshape(b, r, hkv, hq // hkv, d), r))
    row_pos = jnp.repeat(start[:, None] + jnp.arange(r), hq // hkv, axis=1)[:, None, :, None]  # [B, 1, R * G, 1]

    def step(c, carry, masked):
        visible = c * chunk + jnp.arange(chunk) <= row_pos if masked else None
        return _online_step(carry, qh, *_keys(kh, vh, c * chunk, chunk), visible)

    n_full = jnp.min(start + 1) // chunk
    carry = lax.fori_loop(0, n_full, lambda c, carry: step(c, carry, False), _init(qh))
    carry = lax.fori_loop(n_full, _cdiv(jnp.max(start) + r, chunk), lambda c, carry: step(c, carry, True), carry)
    return _finish(carry).reshape(b, hkv, r, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, r, hq, d)


def fused_here(tuning: Tuning) -> bool:
    """Whether the causal and band passes run ``cpu_fused``'s host kernel: the tuning asks, it is available
    (numba, scipy's BLAS on one thread), and the computation runs on one CPU device (with several, e.g. a
    mesh of virtual CPU devices, their concurrent callbacks hung numba's OpenMP threads in a test: the XLA
    passes run there)."""
    return (tuning.fused and cpu_fused.available() and jax.default_backend() == "cpu"
            and jax.local_device_count() == 1)


def _causal(q: jax.Array, k: jax.Array, v: jax.Array, live: jax.Array, tuning: Tuning) -> jax.Array:
    """Dense causal attention of q ``[B, T, Hkv, G, D]``: the fused host kernel or the XLA pass; rows at or
    past ``live`` are not computed."""
    if fused_here(tuning):
        return _fused(q, k, v, live, tuning, n_init=0, n_local=q.shape[1])
    return _causal_xla(q, k, v, live, tuning)


def _fused(q: jax.Array, k: jax.Array, v: jax.Array, live: jax.Array, tuning: Tuning, *, n_init: int,
           n_local: int) -> jax.Array:
    """``cpu_fused.attend`` (sinks + window; dense causal with no sinks and a window of T) through
    ``jax.pure_callback``, in float32 on the host (like the XLA passes, not differentiable: prefill needs
    no gradient, and the probe runs its own attention)."""
    host = functools.partial(cpu_fused.attend, n_init=n_init, n_local=n_local, block_q=tuning.fused_block_q,
                             block_k=tuning.fused_block_kv)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out = jax.pure_callback(host, jax.ShapeDtypeStruct(q.shape, jnp.float32), *f32, jnp.asarray(live, jnp.int32),
                            vmap_method="sequential")
    return out.astype(q.dtype)


def _causal_xla(q: jax.Array, k: jax.Array, v: jax.Array, live: jax.Array, tuning: Tuning) -> jax.Array:
    """Dense causal attention in XLA, heads first, ``query_chunk`` query rows at a time: the keys before
    the chunk in unmasked steps of ``chunk`` keys, then of ``query_chunk`` keys up to the chunk's first
    row, then one masked diagonal step; q ``[B, T, Hkv, G, D]``; query chunks at or past ``live``
    (the longest row) are skipped."""
    b, t, hkv, g, d = q.shape
    rows = min(tuning.query_chunk, round_up(t, 8))
    padded = round_up(t, rows)
    chunk = min(padded, max(rows, tuning.chunk // rows * rows))  # whole query chunks
    qh = _scaled(_heads_first(q, padded))
    kh, vh = (_heads_first(x, padded) for x in (k, v))
    diagonal = (jnp.arange(rows)[:, None] >= jnp.arange(rows)[None, :]).repeat(g, axis=0)  # [rows * G, rows]

    def query_chunk(c, out):
        row0 = c * rows
        qc = lax.dynamic_slice_in_dim(qh, row0 * g, rows * g, axis=2)
        big = row0 // chunk
        carry = lax.fori_loop(0, big, lambda j, cr: _online_step(cr, qc, *_keys(kh, vh, j * chunk, chunk), None),
                              _init(qc))
        carry = lax.fori_loop(big * (chunk // rows), c,
                              lambda j, cr: _online_step(cr, qc, *_keys(kh, vh, j * rows, rows), None), carry)
        carry = _online_step(carry, qc, *_keys(kh, vh, row0, rows), diagonal)
        return lax.dynamic_update_slice_in_dim(out, _finish(carry), row0 * g, axis=2)

    out = lax.fori_loop(0, _cdiv(live, rows), query_chunk, jnp.zeros(qh.shape, jnp.float32))
    return out.reshape(b, hkv, padded, g, d).transpose(0, 2, 1, 3, 4)[:, :t].astype(q.dtype)


def _dynamic(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, lengths: jax.Array, tuning: Tuning) -> jax.Array:
    """A dynamic table: query blocks a chunk at a time; each chunk loops over its key-block steps and
    then its column chunks (gathered once per call, ``[B, H, Vp, D]``), with loop counts read from the
    table, so the work follows the kept pattern and memory stays O(T x kept blocks)."""
    b, t, hq, d = q.shape
    hkv, hsel = k.shape[2], table.heads
    group = hq // hsel
    bq, bkv, nq = table.block_q, table.block_kv, table.num_q_blocks
    kv_head = tables.kv_heads(hsel, hkv)
    blocks = max(1, min(nq, tuning.band_chunk_scores // (b * hq * bq * bkv)))
    nqp = round_up(nq, blocks)
    qs = pad_seq(q, nqp * bq).reshape(b, nqp, bq, hsel, group, d)
    pad_blocks = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, nqp - nq)) + ((0, 0),) * (x.ndim - 3))  # noqa: E731
    # Full steps need no mask, but a causal one costs little here: every step applies the table's rule.
    per_block = [pad_blocks(x) for x in (table.first, table.num_steps)]
    bi = jnp.arange(b)[:, None, None]
    columns = table.columns is not None
    if columns:
        n_chunks, bits = pad_blocks(table.n_chunks), pad_blocks(table.column_bits)
        kc, vc = (tables.gather_columns(x, table) for x in (k, v))  # [B, H, Vp, D]

    def query_chunk(ci, out):
        qb = ci * blocks + jnp.arange(blocks)
        first, n_steps = (jax.lax.dynamic_slice_in_dim(x, ci * blocks, blocks, axis=2) for x in per_block)
        qc = lax.dynamic_slice_in_dim(qs, ci * blocks, blocks, axis=1)  # [B, C, bq, H, G, D]
        rows = (qb[:, None] * bq + jnp.arange(bq))[None, :, None, None, :, None]  # [1, C, 1, 1, bq, 1]

        def block_step(s, carry):
            live = (s < n_steps).transpose(0, 2, 1)  # [B, C, H]
            slot = jnp.minimum(first + s, table.index.shape[-1] - 1)
            entry = jnp.take_along_axis(table.index, slot, axis=-1).transpose(0, 2, 1)
            kb = jnp.clip(table.key_block(qb[None, :, None], entry), 0, t // bkv - 1)
            pos = kb[..., None] * bkv + jnp.arange(bkv)  # [B, C, H, bkv]
            keys = k[bi[..., None], pos, kv_head[None, None, :, None]]  # [B, C, H, bkv, D]
            vals = v[bi[..., None], pos, kv_head[None, None, :, None]]
            scores = _scores(qc, keys, "bcqhgd,bchkd->bchgqk")
            visible = live[..., None, None, None] & table.visible(rows, pos[:, :, :, None, None, :])
            return _online_update(carry, scores, visible, vals, "bchgqk,bchkd->bchgqd")

        chunks = jax.lax.dynamic_slice_in_dim(n_chunks, ci * blocks, blocks, axis=2) if columns else None

        def column_step(c, carry):
            live = (c < chunks).transpose(0, 2, 1)
            counts = tables.chunk_mask(lax.dynamic_slice_in_dim(bits, ci * blocks, blocks, axis=2), c)
            keys = lax.dynamic_slice_in_dim(kc, c * tables.COLUMN_CHUNK, tables.COLUMN_CHUNK, axis=2)  # [B, H, 64, D]
            vals = lax.dynamic_slice_in_dim(vc, c * tables.COLUMN_CHUNK, tables.COLUMN_CHUNK, axis=2)
            scores = _scores(qc, keys, "bcqhgd,bhkd->bchgqk")
            visible = (live[..., None] & counts.transpose(0, 2, 1, 3))[:, :, :, None, None, :]
            return _online_update(carry, scores, visible, vals, "bchgqk,bhkd->bchgqd")

        shape = (b, blocks, hsel, group, bq)
        carry = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (d,), jnp.float32))
        carry = lax.fori_loop(0, jnp.max(n_steps), block_step, carry)
        if columns:
            carry = lax.fori_loop(0, jnp.max(chunks), column_step, carry)
        _, total, acc = carry
        o = acc / jnp.where(total == 0, 1.0, total)[..., None]  # [B, C, H, G, bq, D]
        o = o.transpose(0, 1, 4, 2, 3, 5).reshape(b, blocks * bq, hq, d)
        return lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), ci * blocks * bq, axis=1)

    live_chunks = _cdiv(_cdiv(jnp.max(lengths), bq), blocks)
    out = lax.fori_loop(0, live_chunks, query_chunk, jnp.zeros((b, nqp * bq, hq, d), q.dtype))
    return out[:, :t]
