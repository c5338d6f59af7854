"""Attention tables as Pallas Triton kernels (pre-Hopper NVIDIA GPUs; CPU interpret mode).

``attend`` runs a table (``tables.Table``): one program owns ``block_q`` query rows of one table head
(a KV group for static tables, a selection head for dynamic ones), whose query heads are packed into
the rows of a single ``[block_q * G, D]`` tile (G rounded up to a power of two as Triton needs), so
each K/V tile is loaded once for all of them and K/V are never repeated in memory. The program walks
the key blocks its table row lists (full ones with no mask, then partial ones with the token mask),
then any gathered column chunks; the online softmax runs in float32 in base 2. ``last_rows`` is the
triangle's dense last rows, split over KV chunks and merged by log-sum-exp.

With ``Tuning.interpret`` (the table's ``interpret`` entry: CPU, or ``TMJAX_PALLAS_INTERPRET=1``) the
kernels run in the Pallas interpreter with small blocks: that is how the CPU tests run them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tmjax.pallas_kernels import _common, guards, tables
from tmjax.pallas_kernels.tables import Table
from tmjax.pallas_kernels.two_pass import merge_partials

GUARD_VALUES = False  # masked steps guard themselves (guards.guard_masked_step)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """``block_rows`` rows of the packed ``[block_q * G, D]`` tile (``block_q`` follows the group
    size, at least 16); ``block_kv`` keys per step; ``kv_chunk`` keys per program of the last-rows
    pass; Triton's ``num_warps`` and ``num_stages``; ``interpret``: run in the Pallas interpreter.
    Measured values: ``tuning_tables/triton.json``."""

    block_rows: int = 128
    block_kv: int = 64
    kv_chunk: int = 2048
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool = False


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Why these inputs cannot run here (dtype, head_dim), or None."""
    return _common.unsupported(q, k, v, "triton")


def block_sizes(q_heads: int, kv_heads: int, tuning: Tuning) -> tuple[int, int, int]:
    """(block_q, block_kv, rows_block) of the static tables and the last-rows pass."""
    block_q = max(tuning.block_rows // _next_pow2(q_heads // kv_heads), 16)
    return block_q, tuning.block_kv, block_q


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _init(rows: int, head_dim: int) -> tuple:
    """Online-softmax state (acc, m, l) of a packed query tile with ``rows`` rows."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def _attend(q, carry, lo, hi, fetch, visible, *, scale):
    """Online softmax of the packed query tile over steps ``[lo, hi)``; returns (acc, m, l).

    ``fetch(s)`` gives step ``s``'s ``(k, v)`` tiles; ``visible(s)`` its bool ``[rows, keys]`` mask, or
    ``visible=None`` for steps whose keys every row sees. The band, last-rows and vertical-slash
    kernels all run on this core and differ only in what they fetch and mask.
    """

    def step(s, carry):
        acc, m, l = carry
        k, v = fetch(s)
        qk = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (scale * _common.LOG2E)
        if visible is not None:
            qk, v = guards.guard_masked_step(qk, visible(s), v)
        m_new = jnp.maximum(m, jnp.max(qk, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(qk - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    return jax.lax.fori_loop(lo, hi, step, carry)


def _table_blocks(q, rows, kv_block, n_full, n_steps, k_ref, v_ref, *, block_kv, scale, rule):
    """The listed key blocks of one table row: ``[0, n_full)`` unmasked, then ``[n_full, n_steps)``
    masked token by token by ``rule`` (``tables.Rule``)."""

    def fetch(s):
        start = kv_block(s) * block_kv
        return k_ref[pl.ds(start, block_kv), :], v_ref[pl.ds(start, block_kv), :]

    def visible(s):
        return rule.visible(rows[:, None], kv_block(s) * block_kv + jnp.arange(block_kv)[None, :])

    carry = _attend(q, _init(q.shape[0], q.shape[1]), 0, n_full, fetch, None, scale=scale)
    return _attend(q, carry, n_full, n_steps, fetch, visible, scale=scale)


def _finish(acc, m, l):
    """Normalised output and base-2 log-sum-exp; a row that saw no key gives 0 and -inf."""
    empty = l == 0
    out = acc / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
    return out, lse


def _table_kernel(index_ref, first_ref, full_ref, steps_ref, *refs, block_q, block_kv, group, scale, relative, rule,
                  columns):
    """One query block of one table head: its listed key blocks, then (``columns``) its counted
    column chunks, 64 gathered keys per step with a bit mask."""
    if columns:
        chunks_ref, bits_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref = refs
    qb = pl.program_id(0)
    q = q_ref[...].reshape(block_q * group, -1)
    rows = qb * block_q + jnp.arange(block_q * group) // group
    first = first_ref[qb]
    kv_block = (lambda s: qb - index_ref[first + s]) if relative else (lambda s: index_ref[first + s])
    carry = _table_blocks(q, rows, kv_block, full_ref[qb], steps_ref[qb], k_ref, v_ref, block_kv=block_kv,
                          scale=scale, rule=rule)
    if columns:
        width = tables.COLUMN_CHUNK

        def fetch(c):
            return kc_ref[pl.ds(c * width, width), :], vc_ref[pl.ds(c * width, width), :]

        def visible(c):
            lane = jnp.arange(width)[None, :]
            word = jnp.where(lane < 32, bits_ref[qb, 2 * c], bits_ref[qb, 2 * c + 1])
            return jnp.broadcast_to(((word >> (lane % 32)) & 1) == 1, (q.shape[0], width))

        carry = _attend(q, carry, 0, chunks_ref[qb], fetch, visible, scale=scale)
    out, _ = _finish(*carry)
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)


def _rows_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_q, group, block_kv, chunk_blocks, scale):
    chunk, rb = pl.program_id(0), pl.program_id(1)
    start = start_ref[0]
    q = q_ref[...].reshape(block_q * group, -1)
    row_lo = start + rb * block_q
    rows = row_lo + jnp.arange(block_q * group) // group
    first = chunk * chunk_blocks
    last_needed = (row_lo + block_q - 1) // block_kv  # blocks after it lie after every row
    n_steps = jnp.clip(last_needed + 1 - first, 0, chunk_blocks)
    n_full = jnp.clip((row_lo + 1) // block_kv - first, 0, n_steps)
    acc, m, l = _table_blocks(
        q, rows, lambda s: first + s, n_full, n_steps, k_ref, v_ref,
        block_kv=block_kv, scale=scale, rule=tables.Rule(),
    )
    out, lse = _finish(acc, m, l)
    o_ref[...] = out.reshape(o_ref.shape)
    lse_ref[...] = lse


def _pack_heads(x: jax.Array, hkv: int, group_pad: int) -> jax.Array:
    """``[B, T, Hq, D]`` -> ``[B, T, Hkv, G', D]``, zero query heads added up to ``G'``."""
    b, t, hq, d = x.shape
    x = x.reshape(b, t, hkv, hq // hkv, d)
    if group_pad != hq // hkv:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, group_pad - hq // hkv), (0, 0)))
    return x


def _unpack_heads(x: jax.Array, group: int) -> jax.Array:
    b, t, hkv, _, d = x.shape
    return x[:, :, :, :group].reshape(b, t, hkv * group, d)


def _compiler_params(tuning: Tuning):
    if tuning.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, length: jax.Array, tuning: Tuning) -> jax.Array:
    """Run ``table`` over q ``[B, T, Hq, D]`` and k/v ``[B, T, Hkv, D]`` (``T = table.seq_len``): one
    program per (query block, sequence, table head). ``length`` needs no care here: the table (or
    causality) hides every key past a row's length."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    heads = table.heads if table.dynamic else hkv
    group = hq // heads
    gp = _next_pow2(group)
    bq = table.block_q
    columns = table.columns is not None
    arrays = table.arrays()
    names = ("index", "first", "num_full", "num_steps") + (("n_chunks", "column_bits") if columns else ())
    inputs = [arrays[n] for n in names]
    if table.dynamic:  # each program reads its own (sequence, head) rows
        def spec(x):
            return pl.BlockSpec((None, None) + x.shape[2:], lambda i, bh: (bh // heads, bh % heads) + (0,) * (x.ndim - 2))
    else:  # one shared set
        def spec(x):
            return pl.BlockSpec(x.shape, lambda i, bh: (0,) * x.ndim)
    in_specs = [spec(x) for x in inputs]
    kv_head = lambda bh: (bh % heads) * hkv // heads  # noqa: E731
    qo_spec = pl.BlockSpec((None, bq, None, gp, d), lambda i, bh: (bh // heads, i, bh % heads, 0, 0))
    kv_spec = pl.BlockSpec((None, t, None, d), lambda i, bh: (bh // heads, 0, kv_head(bh), 0))
    q5 = _pack_heads(q, heads, gp)
    inputs += [q5, k, v]
    in_specs += [qo_spec, kv_spec, kv_spec]
    if columns:
        gathered = [tables.gather_columns(x, table) for x in (k, v)]  # [B, H, Vp, D]
        inputs += gathered
        in_specs += [spec(x) for x in gathered]
    kernel = functools.partial(
        _table_kernel, block_q=bq, block_kv=table.block_kv, group=gp, scale=d ** -0.5, relative=table.relative,
        rule=table.rule, columns=columns,
    )
    out = pl.pallas_call(
        kernel,
        grid=(table.num_q_blocks, b * heads),
        in_specs=in_specs,
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
        compiler_params=_compiler_params(tuning),
        interpret=tuning.interpret,
        name="tmjax_table_attention",
    )(*inputs)
    return _unpack_heads(out, group)


def last_rows(q_rows: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, tuning: Tuning) -> jax.Array:
    """The triangle's dense last rows (``R`` rows per batch row from ``start[b]``) over every earlier
    key, split over KV chunks of ``tuning.kv_chunk`` and merged by log-sum-exp."""
    b, r, hq, d = q_rows.shape
    t, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    gp = _next_pow2(group)
    block_q, block_kv, _ = block_sizes(hq, hkv, tuning)
    chunk_blocks = tuning.kv_chunk // block_kv
    q5 = _pack_heads(q_rows, hkv, gp)
    n_chunks = -(-t // (chunk_blocks * block_kv))
    kernel = functools.partial(
        _rows_kernel, block_q=block_q, group=gp, block_kv=block_kv, chunk_blocks=chunk_blocks, scale=d ** -0.5,
    )
    q_spec = pl.BlockSpec((None, block_q, None, gp, d), lambda c, i, bh: (bh // hkv, i, bh % hkv, 0, 0))
    kv_spec = pl.BlockSpec((None, t, None, d), lambda c, i, bh: (bh // hkv, 0, bh % hkv, 0))
    o_spec = pl.BlockSpec((None, None, block_q, None, gp, d), lambda c, i, bh: (c, bh // hkv, i, bh % hkv, 0, 0))
    lse_spec = pl.BlockSpec((None, None, None, block_q * gp), lambda c, i, bh: (c, bh // hkv, bh % hkv, i))
    parts, lse = pl.pallas_call(
        kernel,
        grid=(n_chunks, r // block_q, b * hkv),
        in_specs=[pl.BlockSpec((1,), lambda c, i, bh: (bh // hkv,)), q_spec, kv_spec, kv_spec],
        out_specs=[o_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct((n_chunks, b, r, hkv, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((n_chunks, b, hkv, r * gp), jnp.float32),
        ],
        compiler_params=_compiler_params(tuning),
        interpret=tuning.interpret,
        name="tmjax_last_rows_attention",
    )(start, q5, k, v)
    lse = lse.reshape(n_chunks, b, hkv, r, gp).transpose(0, 1, 3, 2, 4)
    return _unpack_heads(merge_partials(parts, lse), group).astype(q_rows.dtype)
