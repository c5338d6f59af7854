"""Attention tables as Pallas Mosaic TPU kernels, the tables scalar-prefetched.

The layout is head-major (``[B, H, G, T, D]`` for queries, ``[B, Hkv, T, D]`` for K/V) so that one
program holds the ``G`` query heads of a table head (a KV group for static tables, a selection head
for dynamic ones) as one ``[G * block_q, D]`` tile and each K/V block is fetched once for all of them.
The grid's last axis walks a table row: the table sits in scalar memory
(``PrefetchScalarGridSpec``), the K/V index maps read the listed block of each step (then the
gathered column chunks, if any), and steps past the row's count repeat its last block, which the
pipeline does not fetch again. The last rows run over a grid of every key block, clamped to the last
one that their rows can see.

Tested in the Pallas interpreter (``Tuning.interpret``: the table's ``interpret`` entry, on CPU or
with ``TMJAX_PALLAS_INTERPRET=1``); not yet run on TPU hardware. The tables live in scalar memory,
which bounds the sequence length on real TPUs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tmjax.pallas_kernels import _common, guards, tables
from tmjax.pallas_kernels.tables import Table

GUARD_VALUES = False  # masked steps guard themselves (guards.guard_masked_step)
ROWS_BLOCK = 8  # the last-rows pass takes a multiple of 8 rows (sublanes)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """``block_q`` query rows and ``block_kv`` keys per static-table block; ``interpret``: run in the
    Pallas interpreter. Entries: ``tuning_tables/tpu.json``."""

    block_q: int = 128
    block_kv: int = 128
    interpret: bool = False


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Why these inputs cannot run here (dtype, head_dim), or None."""
    return _common.unsupported(q, k, v, "tpu")


def block_sizes(q_heads: int, kv_heads: int, tuning: Tuning) -> tuple[int, int, int]:
    """(block_q, block_kv, rows_block) of the static tables and the last-rows pass."""
    return tuning.block_q, tuning.block_kv, ROWS_BLOCK


def _visible(shape, *, row0, col0, block_q, rule):
    """Token mask of one key block for the packed ``[G * block_q, bkv]`` scores (``tables.Rule``)."""
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0) % block_q
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return rule.visible(rows, cols)


def _step(q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, visible=None):
    """One key block of the online softmax for the packed ``[G * block_q, D]`` query tile;
    ``visible(shape)`` gives the block's mask, None when every row sees every key."""
    q = q_ref[...].reshape(-1, q_ref.shape[-1])
    k, v = k_ref[...], v_ref[...]
    qk = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    qk = qk * (scale * _common.LOG2E)
    if visible is not None:
        qk, v = guards.guard_masked_step(qk, visible(qk.shape), v)
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


def _table_kernel(*refs, dynamic, columns, heads, nq, row_len, words, grid_steps, block_q, block_kv, relative, rule,
                  scale):
    """Grid step ``s`` of one (sequence, table head, query block): listed key block ``s`` (full ones
    unmasked, then partial ones masked by ``rule``), then column chunk ``s - num_steps``; later steps
    idle."""
    n_tables = 6 if columns else 4
    index, first, full, steps = refs[:4]
    q_ref, k_ref, v_ref = refs[n_tables:n_tables + 3]
    o_ref, acc_ref, m_ref, l_ref = refs[-4:]
    b, h, qb, s = (pl.program_id(i) for i in range(4))
    item = (b * heads + h) * nq + qb if dynamic else qb
    n_full, n_steps = full[item], steps[item]
    base = (b * heads + h) * row_len if dynamic else 0
    entry = index[base + first[item] + jnp.clip(s, 0, jnp.maximum(n_steps - 1, 0))]
    kb = qb - entry if relative else entry
    step = functools.partial(_step, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scale=scale)
    partial_mask = functools.partial(_visible, row0=qb * block_q, col0=kb * block_kv, block_q=block_q, rule=rule)
    pl.when(s == 0)(lambda: _init(acc_ref, m_ref, l_ref))
    pl.when(s < n_full)(lambda: step())
    pl.when((s >= n_full) & (s < n_steps))(lambda: step(visible=partial_mask))
    if columns:
        chunks, bits = refs[4:6]
        kc_ref, vc_ref = refs[n_tables + 3:n_tables + 5]
        column = functools.partial(_step, q_ref, kc_ref, vc_ref, acc_ref, m_ref, l_ref, scale=scale)

        def counted(shape):
            chunk = s - n_steps
            lane = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
            word = jnp.where(lane < 32, bits[item * words + 2 * chunk], bits[item * words + 2 * chunk + 1])
            return ((word >> (lane % 32)) & 1) == 1

        pl.when((s >= n_steps) & (s < n_steps + chunks[item]))(lambda: column(visible=counted))
    pl.when(s == grid_steps - 1)(lambda: _write(o_ref, acc_ref, l_ref))


def _rows_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, m_ref, l_ref, *, num_blocks, rows, block_kv, scale):
    s = pl.program_id(2)
    start = start_ref[pl.program_id(0)]
    last_needed = (start + rows - 1) // block_kv
    step = functools.partial(_step, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, scale=scale)
    visible = functools.partial(_visible, row0=start, col0=s * block_kv, block_q=rows, rule=tables.Rule())
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


def _call(kernel, *, prefetch: int, grid: tuple, in_specs: list, out_spec, scratch_rows: int, out_shape, name: str,
          tuning: Tuning):
    """``pallas_call`` of a kernel whose grid's last axis walks steps (``arbitrary``), the first
    ``prefetch`` inputs scalar-prefetched, with the online-softmax scratch for ``scratch_rows`` rows."""
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=prefetch, grid=grid, in_specs=in_specs, out_specs=out_spec,
        scratch_shapes=_scratch(scratch_rows, out_shape.shape[-1]),
    )
    semantics = ("parallel",) * (len(grid) - 1) + ("arbitrary",)
    params = None if tuning.interpret else pltpu.CompilerParams(dimension_semantics=semantics)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=params,
                          interpret=tuning.interpret, name=name)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, length: jax.Array, tuning: Tuning) -> jax.Array:
    """Run ``table`` over q ``[B, T, Hq, D]`` and k/v ``[B, T, Hkv, D]`` (``T = table.seq_len``): grid
    (sequence, table head, query block, step), the steps bounded by the table's ``max_steps`` plus its
    column chunks. ``length`` needs no care here: the table (or causality) hides every key past it."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    heads = table.heads if table.dynamic else hkv
    g, nq = hq // heads, table.num_q_blocks
    bq, bkv = table.block_q, table.block_kv
    columns = table.columns is not None
    arrays = table.arrays()
    names = ("index", "first", "num_full", "num_steps") + (("n_chunks", "column_bits") if columns else ())
    prefetch = [arrays[n].reshape(-1) for n in names]
    grid_steps = table.max_steps + table.max_chunks
    row_len = table.index.shape[-1]

    def item(b_, h, qb):
        return (b_ * heads + h) * nq + qb if table.dynamic else qb

    def kv_index(b_, h, qb, s, index, first, full, steps, *_):
        it = item(b_, h, qb)
        base = (b_ * heads + h) * row_len if table.dynamic else 0
        entry = index[base + first[it] + jnp.clip(s, 0, jnp.maximum(steps[it] - 1, 0))]
        kb = qb - entry if table.relative else entry
        return b_, h * hkv // heads, jnp.where(steps[it] > 0, kb, 0), 0

    q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b_, h, qb, s, *_: (b_, h, 0, qb, 0))
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_index)
    in_specs = [q_spec, kv_spec, kv_spec]
    inputs = [q.reshape(b, t, heads, g, d).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)]
    if columns:
        def column_index(b_, h, qb, s, index, first, full, steps, chunks, bits):
            it = item(b_, h, qb)
            return b_, h, jnp.clip(s - steps[it], 0, jnp.maximum(chunks[it] - 1, 0)), 0

        col_spec = pl.BlockSpec((None, None, tables.COLUMN_CHUNK, d), column_index)
        in_specs += [col_spec, col_spec]
        inputs += [tables.gather_columns(x, table) for x in (k, v)]  # [B, H, Vp, D]
    kernel = functools.partial(
        _table_kernel, dynamic=table.dynamic, columns=columns, heads=heads, nq=nq, row_len=row_len,
        words=table.column_bits.shape[-1] if columns else 0, grid_steps=grid_steps, block_q=bq, block_kv=bkv,
        relative=table.relative, rule=table.rule, scale=d ** -0.5,
    )
    out = _call(
        kernel, prefetch=len(prefetch), grid=(b, heads, nq, grid_steps), in_specs=in_specs, out_spec=q_spec,
        scratch_rows=g * bq, out_shape=jax.ShapeDtypeStruct((b, heads, g, t, d), q.dtype),
        name="tmjax_table_attention_tpu", tuning=tuning,
    )(*prefetch, *inputs)
    return _seq_major(out)


def last_rows(q_rows: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, tuning: Tuning) -> jax.Array:
    """The triangle's dense last rows (``R`` rows per batch row from ``start[b]``) over every key
    block up to the last one they can see."""
    b, r, hq, d = q_rows.shape
    hkv, bkv = k.shape[2], tuning.block_kv
    g = hq // hkv
    num_blocks = k.shape[1] // bkv
    kernel = functools.partial(_rows_kernel, num_blocks=num_blocks, rows=r, block_kv=bkv, scale=d ** -0.5)

    def kv_index(b_, h, s, start_ref):
        return b_, h, jnp.minimum(s, (start_ref[b_] + r - 1) // bkv), 0

    q_spec = pl.BlockSpec((None, None, g, r, d), lambda b_, h, s, start_ref: (b_, h, 0, 0, 0))
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_index)
    out = _call(
        kernel, prefetch=1, grid=(b, hkv, num_blocks), in_specs=[q_spec, kv_spec, kv_spec], out_spec=q_spec,
        scratch_rows=g * r, out_shape=jax.ShapeDtypeStruct((b, hkv, g, r, d), q_rows.dtype),
        name="tmjax_last_rows_attention_tpu", tuning=tuning,
    )(start, _head_major(q_rows, hkv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return _seq_major(out)
