"""Triangle and causal attention as Pallas Triton kernels (pre-Hopper NVIDIA GPUs; CPU interpret mode).

One program owns ``block_q`` query rows of one KV group: the group's query heads are packed into the
rows of a single ``[block_q * G, D]`` tile (G = heads per KV head, rounded up to a power of two as
Triton needs), so each K/V tile is loaded once for all of them and K/V are never repeated in memory.
The program walks the key blocks its block-table row lists: full blocks with no mask, then partial
blocks with the token-level mask; the online softmax runs in float32 in base 2.

On CPU (or with ``TMJAX_PALLAS_INTERPRET=1``, or ``interpret=True``) the kernels run in the Pallas
interpreter with small blocks: that is how the CPU tests run them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tmjax.pallas_kernels import _common, dynamic_tables
from tmjax.pallas_kernels.block_tables import BlockTable

BLOCK_ROWS = 128  # rows of the packed [block_q * G, D] tile on GPU
BLOCK_KV = 64
KV_CHUNK = 2048  # keys per program in the split last-rows pass
INTERPRET_BLOCK = 16  # smaller blocks in interpret mode keep the CPU tests fast


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
            qk, v = _common.guard_masked_step(qk, visible(s), v)
        m_new = jnp.maximum(m, jnp.max(qk, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(qk - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    return jax.lax.fori_loop(lo, hi, step, carry)


def _table_blocks(q, rows, kv_block, n_full, n_steps, k_ref, v_ref, *, block_kv, scale, n_init, n_local):
    """The listed key blocks of one table row: ``[0, n_full)`` unmasked, then ``[n_full, n_steps)``
    masked token by token (causal, and the band's sinks + window unless ``n_local`` is None)."""

    def fetch(s):
        start = kv_block(s) * block_kv
        return k_ref[pl.ds(start, block_kv), :], v_ref[pl.ds(start, block_kv), :]

    def visible(s):
        cols = kv_block(s) * block_kv + jnp.arange(block_kv)[None, :]
        r = rows[:, None]
        seen = cols <= r
        if n_local is not None:
            seen &= (cols < n_init) | (r - cols < n_local)
        return seen

    carry = _attend(q, _init(q.shape[0], q.shape[1]), 0, n_full, fetch, None, scale=scale)
    return _attend(q, carry, n_full, n_steps, fetch, visible, scale=scale)


def _finish(acc, m, l):
    """Normalised output and base-2 log-sum-exp; a row that saw no key gives 0 and -inf."""
    empty = l == 0
    out = acc / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
    return out, lse


def _band_kernel(kv_index_ref, num_full_ref, num_steps_ref, q_ref, k_ref, v_ref, o_ref, *, block_q, group, block_kv, scale, n_init, n_local):
    qb = pl.program_id(0)
    q = q_ref[...].reshape(block_q * group, -1)
    rows = qb * block_q + jnp.arange(block_q * group) // group
    acc, m, l = _table_blocks(
        q, rows, lambda s: kv_index_ref[qb, s], num_full_ref[qb], num_steps_ref[qb], k_ref, v_ref,
        block_kv=block_kv, scale=scale, n_init=n_init, n_local=n_local,
    )
    out, _ = _finish(acc, m, l)
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
        block_kv=block_kv, scale=scale, n_init=0, n_local=None,
    )
    out, lse = _finish(acc, m, l)
    o_ref[...] = out.reshape(o_ref.shape)
    lse_ref[...] = lse


def _vs_kernel(offsets_ref, first_ref, n_steps_ref, n_chunks_ref, bits_ref, q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref,
               *, group, scale):
    """One 64-row query block of one selection head: its slash key blocks (the diagonal block last,
    causal), then its counted columns, 64 gathered keys per step with a bit mask."""
    qb = pl.program_id(0)
    bq = dynamic_tables.BLOCK
    q = q_ref[...].reshape(bq * group, -1)
    rows = qb * bq + jnp.arange(bq * group) // group
    first, n = first_ref[qb], n_steps_ref[qb]
    carry = _table_blocks(
        q, rows, lambda s: qb - offsets_ref[first + s], jnp.maximum(n - 1, 0), n, k_ref, v_ref,
        block_kv=bq, scale=scale, n_init=0, n_local=None,
    )

    def fetch(c):
        return kc_ref[pl.ds(c * bq, bq), :], vc_ref[pl.ds(c * bq, bq), :]

    def visible(c):
        lane = jnp.arange(bq)[None, :]
        word = jnp.where(lane < 32, bits_ref[qb, 2 * c], bits_ref[qb, 2 * c + 1])
        return jnp.broadcast_to(((word >> (lane % 32)) & 1) == 1, (q.shape[0], bq))

    out, _ = _finish(*_attend(q, carry, 0, n_chunks_ref[qb], fetch, visible, scale=scale))
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)


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


class _Config:
    """Block sizes for one call: rows per program follow the group size so the tile stays ~BLOCK_ROWS."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, interpret: bool):
        self.hkv = kv_heads
        self.group = q_heads // kv_heads
        self.group_pad = _next_pow2(self.group)
        self.interpret = interpret
        tile = INTERPRET_BLOCK if interpret else BLOCK_ROWS
        self.block_q = max(tile // self.group_pad, 16)
        self.block_kv = INTERPRET_BLOCK if interpret else BLOCK_KV
        self.chunk_blocks = (2 * INTERPRET_BLOCK if interpret else KV_CHUNK) // self.block_kv
        self.scale = head_dim ** -0.5
        self.params = None if interpret else _compiler_params(head_dim)


def band_block_sizes(q_heads: int, kv_heads: int, *, interpret: bool | None = None) -> tuple[int, int]:
    """(block_q, block_kv) of the band pass's block table for these head counts."""
    cfg = _Config(q_heads, kv_heads, 64, _common.interpret_mode(interpret))
    return cfg.block_q, cfg.block_kv


def _compiler_params(head_dim: int):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _band_pass(cfg: _Config, n_init: int, n_local: int | None):
    def run(q, k, v, table: BlockTable) -> jax.Array:
        b, t, hq, d = q.shape
        q5 = _pack_heads(q, cfg.hkv, cfg.group_pad)
        nq = table.kv_index.shape[0]
        kernel = functools.partial(
            _band_kernel, block_q=cfg.block_q, group=cfg.group_pad, block_kv=cfg.block_kv,
            scale=cfg.scale, n_init=n_init, n_local=n_local,
        )
        qo_spec = pl.BlockSpec((None, cfg.block_q, None, cfg.group_pad, d), lambda i, bh: (bh // cfg.hkv, i, bh % cfg.hkv, 0, 0))
        kv_spec = pl.BlockSpec((None, t, None, d), lambda i, bh: (bh // cfg.hkv, 0, bh % cfg.hkv, 0))
        whole = lambda shape: pl.BlockSpec(shape, lambda i, bh: (0,) * len(shape))  # noqa: E731
        out = pl.pallas_call(
            kernel,
            grid=(nq, b * cfg.hkv),
            in_specs=[whole(table.kv_index.shape), whole((nq,)), whole((nq,)), qo_spec, kv_spec, kv_spec],
            out_specs=qo_spec,
            out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
            compiler_params=cfg.params,
            interpret=cfg.interpret,
            name="tmjax_band_attention",
        )(jnp.asarray(table.kv_index), jnp.asarray(table.num_full), jnp.asarray(table.num_steps), q5, k, v)
        return _unpack_heads(out, cfg.group)

    return run


def _rows_pass(cfg: _Config):
    def run(q_rows, k, v, start) -> jax.Array:
        b, r, hq, d = q_rows.shape
        t = k.shape[1]
        q5 = _pack_heads(q_rows, cfg.hkv, cfg.group_pad)
        n_chunks = -(-t // (cfg.chunk_blocks * cfg.block_kv))
        n_row_blocks = r // cfg.block_q
        kernel = functools.partial(
            _rows_kernel, block_q=cfg.block_q, group=cfg.group_pad, block_kv=cfg.block_kv,
            chunk_blocks=cfg.chunk_blocks, scale=cfg.scale,
        )
        gp = cfg.group_pad
        q_spec = pl.BlockSpec((None, cfg.block_q, None, gp, d), lambda c, i, bh: (bh // cfg.hkv, i, bh % cfg.hkv, 0, 0))
        kv_spec = pl.BlockSpec((None, t, None, d), lambda c, i, bh: (bh // cfg.hkv, 0, bh % cfg.hkv, 0))
        o_spec = pl.BlockSpec((None, None, cfg.block_q, None, gp, d), lambda c, i, bh: (c, bh // cfg.hkv, i, bh % cfg.hkv, 0, 0))
        lse_spec = pl.BlockSpec((None, None, None, cfg.block_q * gp), lambda c, i, bh: (c, bh // cfg.hkv, bh % cfg.hkv, i))
        parts, lse = pl.pallas_call(
            kernel,
            grid=(n_chunks, n_row_blocks, b * cfg.hkv),
            in_specs=[pl.BlockSpec((1,), lambda c, i, bh: (bh // cfg.hkv,)), q_spec, kv_spec, kv_spec],
            out_specs=[o_spec, lse_spec],
            out_shape=[
                jax.ShapeDtypeStruct((n_chunks, b, r, cfg.hkv, gp, d), jnp.float32),
                jax.ShapeDtypeStruct((n_chunks, b, cfg.hkv, r * gp), jnp.float32),
            ],
            compiler_params=cfg.params,
            interpret=cfg.interpret,
            name="tmjax_last_rows_attention",
        )(start, q5, k, v)
        lse = lse.reshape(n_chunks, b, cfg.hkv, r, gp).transpose(0, 1, 3, 2, 4)
        merged = _common.merge_partials(parts, lse)
        return _unpack_heads(merged, cfg.group).astype(q_rows.dtype)

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
    """Triangle attention (see ``tmjax.triangle_attention``) with Pallas Triton kernels."""
    length = _common.row_lengths(length, q.shape[0], q.shape[1])
    _common.check_inputs(q, k, v, "triton")
    cfg = _Config(q.shape[2], k.shape[2], q.shape[3], _common.interpret_mode(interpret))
    return _common.triangle_two_pass(
        q, k, v, n_init=n_init, n_local=n_local, n_last=n_last, length=length,
        block_q=cfg.block_q, block_kv=cfg.block_kv, rows_block=cfg.block_q,
        band_pass=_band_pass(cfg, n_init, n_local), rows_pass=_rows_pass(cfg),
    )


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, length: int | jax.Array | None, interpret: bool | None = None
) -> jax.Array:
    """Dense causal attention through the causal block table (``length`` needs no special care)."""
    _common.row_lengths(length, q.shape[0], q.shape[1])  # validates; causal attention needs no length
    _common.check_inputs(q, k, v, "triton")
    cfg = _Config(q.shape[2], k.shape[2], q.shape[3], _common.interpret_mode(interpret))
    return _common.causal_one_pass(
        q, k, v, block_q=cfg.block_q, block_kv=cfg.block_kv,
        band_pass=_band_pass(cfg, 0, None),
    )


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
    """Vertical-slash attention (see ``tmjax.vertical_slash_attention``) with a Pallas Triton kernel:
    one program per (64-row query block, sequence, selection head), the selection head's query heads
    packed into one tile."""
    b, t, hq, d = q.shape
    lengths = _common.row_lengths(length, b, t)
    _common.check_inputs(q, k, v, "triton")
    hkv, hsel = k.shape[2], columns.shape[1]
    group = hq // hsel
    gp = _next_pow2(group)
    bq = dynamic_tables.BLOCK
    tp = _common.round_up(t, bq)
    nq = tp // bq
    table = dynamic_tables.build(columns, diagonals, lengths, tp)
    qp, kp, vp = (_common.pad_seq(x, tp) for x in (q, k, v))
    kc, vc = (dynamic_tables.gather_columns(x, table) for x in (kp, vp))
    q5 = _pack_heads(qp, hsel, gp)
    kv_head = lambda bh: (bh % hsel) * hkv // hsel  # noqa: E731
    per_head = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, bh: (bh // hsel, bh % hsel) + (0,) * len(shape))  # noqa: E731
    qo_spec = pl.BlockSpec((None, bq, None, gp, d), lambda i, bh: (bh // hsel, i, bh % hsel, 0, 0))
    kv_spec = pl.BlockSpec((None, tp, None, d), lambda i, bh: (bh // hsel, 0, kv_head(bh), 0))
    vp_cols = table.columns.shape[-1]
    interpret = _common.interpret_mode(interpret)
    out = pl.pallas_call(
        functools.partial(_vs_kernel, group=gp, scale=d ** -0.5),
        grid=(nq, b * hsel),
        in_specs=[per_head(2 * nq), per_head(nq), per_head(nq), per_head(nq), per_head(nq, vp_cols // 32),
                  qo_spec, kv_spec, kv_spec, per_head(vp_cols, d), per_head(vp_cols, d)],
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
        compiler_params=None if interpret else _compiler_params(d),
        interpret=interpret,
        name="tmjax_vertical_slash_attention",
    )(table.offsets, table.first, table.n_steps, table.n_chunks, table.column_bits, q5, kp, vp, kc, vc)
    return _unpack_heads(out, group)[:, :t]
