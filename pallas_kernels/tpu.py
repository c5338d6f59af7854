"""Triangle and causal attention as Pallas Mosaic TPU kernels with scalar-prefetched block tables.

The layout is head-major (``[B, Hkv, G, T, D]`` for queries, ``[B, Hkv, T, D]`` for K/V) so that one
program holds the ``G`` query heads of a KV group as one ``[G * block_q, D]`` tile and each K/V
block is fetched once for all of them. The grid's last axis walks a table row: the tables sit in
scalar memory (``PrefetchScalarGridSpec``), the K/V index maps read the listed block of each step,
and steps past the row's count repeat its last block, which the pipeline does not fetch again. The
last rows run over a grid of every key block, clamped to the last one that their rows can see.

Tested in the Pallas interpreter (the default on CPU; also ``interpret=True`` or
``TMJAX_PALLAS_INTERPRET=1``); not yet run on TPU hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tmjax.pallas_kernels import _common, dynamic_tables
from tmjax.pallas_kernels.block_tables import BlockTable

BLOCK_Q = 128
BLOCK_KV = 128
INTERPRET_BLOCK = 16


def _band_visible(shape, *, row0, col0, block_q, n_init, n_local):
    """Token mask of one key block for the packed ``[G * block_q, bkv]`` scores: causal, and the band's
    sinks + window unless ``n_local`` is None."""
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0) % block_q
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    visible = cols <= rows
    if n_local is not None:
        visible &= (cols < n_init) | (rows - cols < n_local)
    return visible


def _step(q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, visible=None):
    """One key block of the online softmax for the packed ``[G * block_q, D]`` query tile;
    ``visible(shape)`` gives the block's mask, None when every row sees every key."""
    q = q_ref[...].reshape(-1, q_ref.shape[-1])
    k, v = k_ref[...], v_ref[...]
    qk = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    qk = qk * (scale * _common.LOG2E)
    if visible is not None:
        qk, v = _common.guard_masked_step(qk, visible(qk.shape), v)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(qk, axis=1, keepdims=True))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(qk - m_new)
    l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha + pv
    m_ref[...] = m_new


def _init(acc_ref, m_ref, l_ref):
    acc_ref[...] = jnp.zeros_like(acc_ref)
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)


def _write(o_ref, acc_ref, l_ref):
    l = l_ref[...]
    out = acc_ref[...] / jnp.where(l == 0, 1.0, l)
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)


def _band_kernel(kv_index_ref, num_full_ref, num_steps_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, m_ref, l_ref, *, max_steps, block_q, block_kv, scale, n_init, n_local):
    qb, s = pl.program_id(2), pl.program_id(3)
    n_full, n_steps = num_full_ref[qb], num_steps_ref[qb]
    step = functools.partial(_step, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scale=scale)
    visible = functools.partial(
        _band_visible, row0=qb * block_q, col0=kv_index_ref[qb * max_steps + s] * block_kv, block_q=block_q,
        n_init=n_init, n_local=n_local,
    )
    pl.when(s == 0)(lambda: _init(acc_ref, m_ref, l_ref))
    pl.when(s < n_full)(lambda: step())
    pl.when((s >= n_full) & (s < n_steps))(lambda: step(visible=visible))
    pl.when(s == max_steps - 1)(lambda: _write(o_ref, acc_ref, l_ref))


def _rows_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, m_ref, l_ref, *, num_blocks, rows, block_kv, scale):
    s = pl.program_id(2)
    start = start_ref[pl.program_id(0)]
    last_needed = (start + rows - 1) // block_kv
    step = functools.partial(_step, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scale=scale)
    visible = functools.partial(_band_visible, row0=start, col0=s * block_kv, block_q=rows, n_init=0, n_local=None)
    full = (s + 1) * block_kv <= start + 1  # every key of the block precedes the first row
    pl.when(s == 0)(lambda: _init(acc_ref, m_ref, l_ref))
    pl.when(full)(lambda: step())
    pl.when(~full & (s <= last_needed))(lambda: step(visible=visible))
    pl.when(s == num_blocks - 1)(lambda: _write(o_ref, acc_ref, l_ref))


def _scratch(rows: int, head_dim: int):
    return [
        pltpu.VMEM((rows, head_dim), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
    ]


def _head_major(q: jax.Array, hkv: int) -> jax.Array:
    b, t, hq, d = q.shape
    return q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)


def _seq_major(x: jax.Array) -> jax.Array:
    b, hkv, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d)


class _Config:
    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, interpret: bool):
        self.hkv = kv_heads
        self.group = q_heads // kv_heads
        self.block_q = INTERPRET_BLOCK if interpret else BLOCK_Q
        self.block_kv = INTERPRET_BLOCK if interpret else BLOCK_KV
        self.scale = head_dim ** -0.5
        self.interpret = interpret
        self.params = None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        )


def band_block_sizes(q_heads: int, kv_heads: int, *, interpret: bool | None = None) -> tuple[int, int]:
    """(block_q, block_kv) of the band pass's block table for these head counts."""
    cfg = _Config(q_heads, kv_heads, 64, _common.interpret_mode(interpret))
    return cfg.block_q, cfg.block_kv


def _band_pass(cfg: _Config, n_init: int, n_local: int | None):
    def run(q, k, v, table: BlockTable) -> jax.Array:
        b, t, hq, d = q.shape
        nq, max_steps = table.kv_index.shape
        g, bq, bkv = cfg.group, cfg.block_q, cfg.block_kv
        kernel = functools.partial(
            _band_kernel, max_steps=max_steps, block_q=bq, block_kv=bkv, scale=cfg.scale, n_init=n_init, n_local=n_local,
        )
        q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b_, h, i, s, idx, nf, ns: (b_, h, 0, i, 0))
        kv_spec = pl.BlockSpec((None, None, bkv, d), lambda b_, h, i, s, idx, nf, ns: (b_, h, idx[i * max_steps + s], 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, cfg.hkv, nq, max_steps),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=_scratch(g * bq, d),
        )
        out = pl.pallas_call(
            kernel,
            grid_spec=grid_spec,
            out_shape=jax.ShapeDtypeStruct((b, cfg.hkv, g, t, d), q.dtype),
            compiler_params=cfg.params,
            interpret=cfg.interpret,
            name="tmjax_band_attention_tpu",
        )(
            jnp.asarray(table.kv_index.reshape(-1)), jnp.asarray(table.num_full), jnp.asarray(table.num_steps),
            _head_major(q, cfg.hkv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        )
        return _seq_major(out)

    return run


def _rows_pass(cfg: _Config):
    def run(q_rows, k, v, start) -> jax.Array:
        b, r, hq, d = q_rows.shape
        g, bkv = cfg.group, cfg.block_kv
        num_blocks = k.shape[1] // bkv
        kernel = functools.partial(_rows_kernel, num_blocks=num_blocks, rows=r, block_kv=bkv, scale=cfg.scale)

        def kv_index(b_, h, s, start_ref):
            return b_, h, jnp.minimum(s, (start_ref[b_] + r - 1) // bkv), 0

        q_spec = pl.BlockSpec((None, None, g, r, d), lambda b_, h, s, start_ref: (b_, h, 0, 0, 0))
        kv_spec = pl.BlockSpec((None, None, bkv, d), kv_index)
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, cfg.hkv, num_blocks),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=_scratch(g * r, d),
        )
        params = None if cfg.interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        )
        out = pl.pallas_call(
            kernel,
            grid_spec=grid_spec,
            out_shape=jax.ShapeDtypeStruct((b, cfg.hkv, g, r, d), q_rows.dtype),
            compiler_params=params,
            interpret=cfg.interpret,
            name="tmjax_last_rows_attention_tpu",
        )(start, _head_major(q_rows, cfg.hkv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        return _seq_major(out)

    return run


def triangle_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    n_init: int,
    n_local: int,
    n_last: int,
    length: int | jax.Array | None,
    interpret: bool | None = None,
) -> jax.Array:
    """Triangle attention (see ``tmjax.triangle_attention``) with Pallas Mosaic TPU kernels."""
    length = _common.row_lengths(length, q.shape[0], q.shape[1])
    _common.check_inputs(q, k, v, "tpu")
    cfg = _Config(q.shape[2], k.shape[2], q.shape[3], _common.interpret_mode(interpret))
    return _common.triangle_two_pass(
        q, k, v, n_init=n_init, n_local=n_local, n_last=n_last, length=length,
        block_q=cfg.block_q, block_kv=cfg.block_kv, rows_block=8,
        band_pass=_band_pass(cfg, n_init, n_local), rows_pass=_rows_pass(cfg),
    )


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, length: int | jax.Array | None, interpret: bool | None = None
) -> jax.Array:
    """Dense causal attention through the causal block table (``length`` needs no special care)."""
    _common.row_lengths(length, q.shape[0], q.shape[1])  # validates; causal attention needs no length
    _common.check_inputs(q, k, v, "tpu")
    cfg = _Config(q.shape[2], k.shape[2], q.shape[3], _common.interpret_mode(interpret))
    return _common.causal_one_pass(
        q, k, v, block_q=cfg.block_q, block_kv=cfg.block_kv, band_pass=_band_pass(cfg, 0, None)
    )


def _vs_kernel(offsets_ref, first_ref, n_steps_ref, n_chunks_ref, bits_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref,
               o_ref, acc_ref, m_ref, l_ref, *, heads, nq, words, max_steps, scale):
    """Grid step ``s`` of one (sequence, selection head, 64-row query block): slash key block ``s``
    (the last one, the diagonal block, causal), then column chunk ``s - n_steps``; later steps idle."""
    b, h, qb, s = (pl.program_id(i) for i in range(4))
    bq = dynamic_tables.BLOCK
    item = (b * heads + h) * nq + qb
    n_steps, n_chunks = n_steps_ref[item], n_chunks_ref[item]
    step = functools.partial(_step, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scale=scale)
    column = functools.partial(_step, q_ref, kc_ref, vc_ref, acc_ref, m_ref, l_ref, scale=scale)

    def counted(shape):
        chunk = s - n_steps
        lane = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        word = jnp.where(lane < 32, bits_ref[item * words + 2 * chunk], bits_ref[item * words + 2 * chunk + 1])
        return ((word >> (lane % 32)) & 1) == 1

    diagonal = functools.partial(_band_visible, row0=qb * bq, col0=qb * bq, block_q=bq, n_init=0, n_local=None)
    pl.when(s == 0)(lambda: _init(acc_ref, m_ref, l_ref))
    pl.when(s < n_steps - 1)(lambda: step())
    pl.when(s == n_steps - 1)(lambda: step(visible=diagonal))
    pl.when((s >= n_steps) & (s < n_steps + n_chunks))(lambda: column(visible=counted))
    pl.when(s == max_steps - 1)(lambda: _write(o_ref, acc_ref, l_ref))


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    columns: jax.Array,
    diagonals: jax.Array,
    length: int | jax.Array | None,
    interpret: bool | None = None,
) -> jax.Array:
    """Vertical-slash attention (see ``tmjax.vertical_slash_attention``) as a Mosaic TPU kernel: the
    dynamic table is scalar-prefetched and the K/V index maps read it, as the static band's do.

    The grid's last axis is a static bound on a query block's steps (its slash blocks, at most
    ``min(T/64, 2 x diagonals)``, plus its column chunks); steps past a block's count repeat the last
    fetched blocks and compute nothing. The tables live in scalar memory, which bounds the sequence
    length on real TPUs (not yet run on one).
    """
    b, t, hq, d = q.shape
    lengths = _common.row_lengths(length, b, t)
    _common.check_inputs(q, k, v, "tpu")
    hkv, hsel = k.shape[2], columns.shape[1]
    bq = dynamic_tables.BLOCK
    tp = _common.round_up(t, bq)
    nq = tp // bq
    table = dynamic_tables.build(columns, diagonals, lengths, tp)
    qp, kp, vp = (_common.pad_seq(x, tp) for x in (q, k, v))
    kc, vc = (dynamic_tables.gather_columns(x, table) for x in (kp, vp))  # [B, H, Vp, D]
    words = table.column_bits.shape[-1]
    max_steps = min(nq, 2 * diagonals.shape[-1]) + table.columns.shape[-1] // bq
    g = hq // hsel

    def kv_index(b_, h, qb, s, offsets, first, n_steps, n_chunks, bits):
        item = (b_ * hsel + h) * nq + qb
        last = jnp.maximum(n_steps[item] - 1, 0)
        kb = qb - offsets[(b_ * hsel + h) * 2 * nq + first[item] + jnp.minimum(s, last)]
        return b_, h * hkv // hsel, jnp.where(n_steps[item] > 0, kb, 0), 0

    def column_index(b_, h, qb, s, offsets, first, n_steps, n_chunks, bits):
        item = (b_ * hsel + h) * nq + qb
        return b_, h, jnp.clip(s - n_steps[item], 0, jnp.maximum(n_chunks[item] - 1, 0)), 0

    q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b_, h, qb, s, *_: (b_, h, 0, qb, 0))
    kv_spec = pl.BlockSpec((None, None, bq, d), kv_index)
    col_spec = pl.BlockSpec((None, None, bq, d), column_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(b, hsel, nq, max_steps),
        in_specs=[q_spec, kv_spec, kv_spec, col_spec, col_spec],
        out_specs=q_spec,
        scratch_shapes=_scratch(g * bq, d),
    )
    interpret = _common.interpret_mode(interpret)
    out = pl.pallas_call(
        functools.partial(_vs_kernel, heads=hsel, nq=nq, words=words, max_steps=max_steps, scale=d ** -0.5),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hsel, g, tp, d), q.dtype),
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="tmjax_vertical_slash_attention_tpu",
    )(
        *(x.reshape(-1) for x in (table.offsets, table.first, table.n_steps, table.n_chunks, table.column_bits)),
        qp.reshape(b, tp, hsel, g, d).transpose(0, 2, 3, 1, 4), kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3), kc, vc,
    )
    return _seq_major(out)[:, :t]
