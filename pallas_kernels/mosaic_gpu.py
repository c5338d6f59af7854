"""Triangle and causal attention as Pallas Mosaic GPU kernels for Hopper (TMA + wgmma), bf16 and fp16.

Each CTA runs three warpgroups: two compute warpgroups of 64 query rows each and one producer that
streams the listed K/V blocks by TMA into a ring of shared-memory slots guarded by barriers. Both
compute warpgroups of a CTA consume the same K/V tiles:

- when the query heads per KV head (G) are even, the two warpgroups take the same 64 rows of two
  query heads of one KV group (each K/V tile in shared memory serves two heads);
- otherwise they take two consecutive 64-row halves of one head (a 128-row table block).

``attend`` runs a table (``tables.Table``) read from global memory: a static one (band or causal)
with the pairing above, a dynamic one (vertical-slash: key blocks, then gathered column chunks) per
64-row query block and selection head. Full blocks run unmasked, then partial blocks with the token
mask. ``last_rows`` (the triangle's dense last rows) runs as a second launch split over KV chunks
(each CTA: one chunk, one row block), whose per-chunk results are merged by log-sum-exp. K and V come
through ``guards.guard_values`` (the dispatch, ``GUARD_VALUES``): masked steps read V from shared
memory as is.
The softmax is the base-2 online softmax in float32 with the two compute warpgroups ping-ponging on
the tensor cores (a schedule barrier), as in jax's FlashAttention-3 example, whose structure this
follows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tmjax.pallas_kernels import _common, tables
from tmjax.pallas_kernels.guards import GUARDS
from tmjax.pallas_kernels.tables import Table
from tmjax.pallas_kernels.two_pass import merge_partials

ROWS = 64  # query rows per compute warpgroup (the wgmma M dimension)
GUARD_VALUES = True  # masked steps use V as it is: the dispatch passes K and V through guards.guard_values


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block sizes: ``block_kv`` keys per step, ``stages`` K/V slots in flight, ``kv_chunk`` keys per
    CTA in the last-rows pass, ``items`` consecutive query blocks per CTA in a static table (band or
    causal; 1: one block per CTA). With several, the K/V ring runs on from one block to the next and
    the next block's queries load while the current one computes, so a short band block no longer pays
    the pipeline's fill and the query load alone. ``guard``: when the dispatch passes K and V through
    ``guards.guard_values`` (``guards.guarded``: "always", the default, or "nonfinite", only when V holds
    a non-finite entry: measured faster at 32/8/128 on an H100, where the table sets it). ``sink_keys`` (0: off; 64 with
    ``block_kv=128``): in a band table whose sinks fit (``n_init <= sink_keys``), a step on key block 0
    that only sees the sinks computes the block's first ``sink_keys`` keys instead of all ``block_kv``
    (a whole 128-key block for 8 sinks is a sixth of a 64-row block's band steps). ``edges`` (with
    ``block_kv=128``): a partial step whose visible keys all lie in one 64-key half of the block (the
    window's first block, the diagonal block of a 64-row warpgroup) computes only that half (see
    ``edge_halves``). Measured values: ``tuning_tables/mosaic_gpu.json``."""

    block_kv: int = 128
    stages: int = 2
    kv_chunk: int = 4096
    items: int = 1
    guard: str = "always"
    sink_keys: int = 0
    edges: bool = False

    def __post_init__(self) -> None:
        if self.block_kv not in (64, 128):
            raise ValueError(f"block_kv must be 64 or 128, got {self.block_kv}")
        if not isinstance(self.items, int) or self.items < 1:
            raise ValueError(f"items must be a positive int, got {self.items!r}")
        if self.guard not in GUARDS:
            raise ValueError(f"guard must be one of {GUARDS}, got {self.guard!r}")
        if self.sink_keys % 64 or not 0 <= self.sink_keys < self.block_kv:
            raise ValueError(f"sink_keys must be 0 or a multiple of 64 below block_kv ({self.block_kv}; the P.V "
                             f"product's K dimension follows the tiles' 128-byte swizzle), got {self.sink_keys}")
        if self.edges not in (False, True) or (self.edges and self.block_kv != 128):
            raise ValueError(f"edges (half-block edge steps) needs block_kv 128 and a bool, got edges={self.edges!r} "
                             f"with block_kv {self.block_kv}")
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.kv_chunk % self.block_kv:
            raise ValueError(f"kv_chunk ({self.kv_chunk}) must be a multiple of block_kv ({self.block_kv})")


def edge_halves(row, first_block, last_block, n_masked, *, block_kv: int, n_init: int, n_local: int | None):
    """(high, low), each 0 or 1: whether a warpgroup's first masked step (key block ``first_block``)
    sees keys only in the block's second half, and whether its last one (``last_block``, another step)
    sees keys only in the first half. Rows ``[row, row + ROWS)``, ``n_masked`` masked steps, the band
    rule with ``n_local`` (None: causal). Takes traced scalars in the kernel, numpy arrays in tests.

    A first half holds no visible key when it holds no sink and its last key lies before the window
    of the warpgroup's first row; a second half holds none when it starts past the last row."""
    half = block_kv // 2
    high = 0
    if n_local is not None:
        start = first_block * block_kv
        high = ((n_masked > 0) & (start >= n_init) & (row - n_local + 1 >= start + half)).astype(np.int32)
    low = ((n_masked > high) & (row + ROWS - 1 < last_block * block_kv + half)).astype(np.int32)
    return high, low


def sink_steps(row, n_full, n_steps, first_partial, *, block_kv: int, n_local: int):
    """1 when a warpgroup's first partial step (key block ``first_partial``, after ``n_full`` full
    steps of ``n_steps``) is key block 0 and each of its rows, from ``row``, sees only the sinks there
    (the window of its first row starts past the block), else 0: how many narrow sink steps the kernel
    runs with ``sink_keys``. Takes traced scalars in the kernel, numpy scalars in tests."""
    return ((n_full < n_steps) & (first_partial == 0) & (row >= n_local + block_kv - 1)).astype(np.int32)


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Why these inputs cannot run here (dtype, head_dim), or None."""
    return _common.unsupported(q, k, v, "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class _Work:
    """What one compute warpgroup (or the producer) of a CTA needs to know about its work item."""

    batch: jax.Array
    kv_head: jax.Array
    row: jax.Array  # sequence position of the warpgroup's first query row
    q_src: object  # GMEM ref of the warpgroup's [ROWS, D] query tile
    o_dst: object  # GMEM ref of its [ROWS, D] output tile
    lse_dst: object  # GMEM ref of its [ROWS] log-sum-exp, or None
    n_full: jax.Array
    n_steps: jax.Array
    kv_block: object  # step -> key block index
    # Optional column phase after the listed blocks (vertical-slash): n_cols steps whose K/V tiles are
    # col_src(c) = (k, v) GMEM refs and whose mask is bit j of the two words col_bits(c) returns.
    n_cols: jax.Array | int = 0
    col_src: object = None
    col_bits: object = None


def _pipeline(work_of, k_ref, v_ref, smem, barriers, *, block_kv, stages, scale, n_init, n_local, dtype, consumers=2,
              n_items=None, sink_keys=0, edges=False):
    """Producer/consumer attention over the steps ``work_of(wg, item)`` lists (see the module docstring).

    ``consumers`` compute warpgroups (1 or 2; two ping-pong on the tensor cores) share every K/V
    tile; the warpgroup after them is the producer. ``n_items`` (None: one item) is how many work
    items the CTA runs one after the other: step ``s`` of an item is the ring's step ``base + s``,
    ``base`` the steps of the items before it, so the producer fills the ring for the next item while
    the consumers finish the current one; an item's queries load (into the other of two query
    buffers) while the item before it computes, and its output leaves through a buffer of its own.
    ``sink_keys`` (0: off; band tables with ``0 < n_init <= sink_keys``) runs a step that sees only the
    sinks of key block 0 on the tile's first ``sink_keys`` keys instead of all ``block_kv``. ``edges``
    (``block_kv`` 128) runs the first and last masked steps on one 64-key half of their tiles where
    ``edge_halves`` finds the other half invisible to all of a warpgroup's rows."""
    q_smem2, o_smem2, k_smem, v_smem, lse_smem2 = smem
    (k_ready, v_ready, q_ready), (k_free, v_free), turn = barriers
    wg = lax.axis_index("wg")
    head_dim = k_smem.shape[-1]
    c = scale * _common.LOG2E
    pingpong = consumers == 2
    q_buffers = q_smem2.shape[1]  # 2 with several items (double-buffered queries), else 1

    def take_turn():
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def column_mask(w, column):
        lane = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
        low, high = w.col_bits(column)
        word = jnp.where(lane < 32, lane * 0 + low, lane * 0 + high)
        return ((word >> (lane & 31)) & 1) == 1

    def items(body):
        """``body(item, base) -> base``, over the CTA's items."""
        if n_items is None:
            body(0, 0)
        else:
            lax.fori_loop(0, n_items, body, jnp.int32(0))

    @pl.when(wg < consumers)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        def load_queries(item, buffer):
            plgpu.copy_gmem_to_smem(work_of(wg, item).q_src, q_smem2.at[wg, buffer], q_ready.at[wg * q_buffers + buffer])

        def item_body(item, base):
            w = work_of(wg, item)
            buffer = 0 if n_items is None else lax.rem(item, jnp.int32(q_buffers))
            q_tile = q_smem2.at[wg, buffer]
            plgpu.barrier_wait(q_ready.at[wg * q_buffers + buffer])
            if n_items is not None:  # the other buffer's queries (the item before) are no longer read

                @pl.when(item + 1 < n_items)
                def _():
                    load_queries(item + 1, 1 - buffer)

            m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

            total = w.n_steps + w.n_cols

            def slot_of(s):
                ring_step = s + base
                return ring_step % stages if isinstance(ring_step, int) else lax.rem(ring_step, jnp.int32(stages))

            @pl.when(total > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[slot_of(0)])

            pl.when(wg == 1)(take_turn)

            def visible_keys(s, masked, width, offset):
                """The [ROWS, width] mask of step ``s`` over its keys from ``offset`` in the block (``masked``:
                "columns", "sinks", "low", "high" or True)."""
                if masked == "columns":
                    return column_mask(w, s - w.n_steps)
                if masked == "sinks":
                    return plgpu.broadcasted_iota(jnp.int32, (ROWS, width), 1, layout=plgpu.Layout.WGMMA) < n_init
                rows = w.row + plgpu.broadcasted_iota(jnp.int32, (ROWS, width), 0, layout=plgpu.Layout.WGMMA)
                cols = w.kv_block(s) * block_kv + offset + plgpu.broadcasted_iota(
                    jnp.int32, (ROWS, width), 1, layout=plgpu.Layout.WGMMA
                )
                visible = cols <= rows
                if n_local is not None:
                    visible = visible & ((cols < n_init) | (rows - cols < n_local))
                return visible

            def online_softmax(qk, m_i, l_i, visible):
                """(alpha, m_new, l_new, p) of one step's scores; ``visible`` None: every key is seen."""
                if visible is not None:
                    # Scale, then mask with -inf: a finite mask value M scaled inside exp2(M * c - m) is
                    # contracted into an FMA whose unrounded product differs from the rounded maximum m by
                    # up to ~1e21, so a row that sees nothing yet got p = exp2(+1e21) = inf and later NaN
                    # (issue 17: head_dim 64 without sinks). A row with no visible key so far keeps
                    # m = -inf and takes 0 as its reference, so its p and alpha are exactly 0.
                    scaled = jnp.where(visible, qk * c, -jnp.inf)
                    m_new = jnp.maximum(m_i, scaled.max(axis=1))
                    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    alpha = jnp.exp2(m_i - m_ref)
                    p = jnp.exp2(scaled - lax.broadcast_in_dim(m_ref, qk.shape, [0]))
                else:  # every row sees every key: m_new is finite
                    m_new = jnp.maximum(m_i, qk.max(axis=1) * c)
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(qk * c - lax.broadcast_in_dim(m_new, qk.shape, [0]))
                return alpha, m_new, l_i * alpha + p.sum(axis=1), p

            def step(s, carry, masked):
                acc, m_i, l_i = carry
                slot = slot_of(s)
                # A sink step computes only the tile's first sink_keys keys: the sinks (the rest of the
                # block is outside every row's window, see sink_steps); an edge step one half
                width, offset = {"sinks": (sink_keys, 0), "low": (block_kv // 2, 0),
                                 "high": (block_kv // 2, block_kv // 2)}.get(masked, (block_kv, 0))
                k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
                if width != block_kv:
                    k_tile, v_tile = k_tile.at[pl.ds(offset, width)], v_tile.at[pl.ds(offset, width)]

                def qk_product(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, k_tile.transpose((1, 0)))
                    take_turn()
                    return acc_ref[...]

                qk = pl.run_scoped(qk_product, plgpu.ACC((ROWS, width), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                visible = visible_keys(s, masked, width, offset) if masked else None
                alpha, m_new, l_i, p = online_softmax(qk, m_i, l_i, visible)
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                if pingpong:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                if pingpong:
                    plgpu.barrier_wait(turn)

                def pv_product(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_tile)
                    nxt = s + 1

                    @pl.when(nxt < total)
                    def _():
                        plgpu.barrier_wait(k_ready.at[slot_of(nxt)])

                acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = lax.fori_loop(0, w.n_full, functools.partial(_unmasked, step), (acc, m_i, l_i))
            masked_from = w.n_full
            if sink_keys:  # 0 or 1 sink step, the first partial one
                first_partial = w.kv_block(jnp.clip(w.n_full, 0, jnp.maximum(w.n_steps - 1, 0)))
                masked_from = w.n_full + sink_steps(w.row, w.n_full, w.n_steps, first_partial, block_kv=block_kv,
                                                    n_local=n_local)
                carry = lax.fori_loop(w.n_full, masked_from, functools.partial(step, masked="sinks"), carry)
            if edges:  # 0 or 1 step on each end of the masked ones, on one half of its tile
                last = jnp.maximum(w.n_steps - 1, 0)
                high, low = edge_halves(
                    w.row, w.kv_block(jnp.minimum(masked_from, last)), w.kv_block(last), w.n_steps - masked_from,
                    block_kv=block_kv, n_init=n_init, n_local=n_local,
                )
                carry = lax.fori_loop(masked_from, masked_from + high, functools.partial(step, masked="high"), carry)
                carry = lax.fori_loop(masked_from + high, w.n_steps - low, functools.partial(_masked, step), carry)
                carry = lax.fori_loop(w.n_steps - low, w.n_steps, functools.partial(step, masked="low"), carry)
            else:
                carry = lax.fori_loop(masked_from, w.n_steps, functools.partial(_masked, step), carry)
            if w.col_src is not None:
                carry = lax.fori_loop(w.n_steps, total, functools.partial(step, masked="columns"), carry)
            acc, m_i, l_i = carry
            pl.when(wg == 0)(take_turn)

            l_safe = jnp.where(l_i == 0, 1.0, l_i)  # a row with no key in this chunk: output 0, lse -inf
            acc /= lax.broadcast_in_dim(l_safe, (ROWS, head_dim), [0])
            if o_smem2 is None:  # one item: the output leaves through its query buffer
                o_tile = q_tile
            else:  # the item before's output must have left its buffer
                o_tile = o_smem2.at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_tile[...] = acc.astype(dtype)
            if lse_smem2 is not None:
                lse_smem2.at[wg][...] = m_i + jnp.log(l_safe) * (1 / math.log(2))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_tile, w.o_dst)
            if lse_smem2 is not None:
                plgpu.copy_smem_to_gmem(lse_smem2.at[wg], w.lse_dst)
            return base + total

        load_queries(0, 0)
        items(item_body)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")

        def item_body(item, base):
            w = work_of(0, item)
            total = w.n_steps + w.n_cols

            def fetch(which, s, slot):
                """Copy step ``s``'s K (which=0) or V (which=1) tile into ``slot``."""
                ref, dst, ready = (k_ref, k_smem, k_ready) if which == 0 else (v_ref, v_smem, v_ready)

                def listed_block():
                    rows = pl.ds(w.kv_block(s) * block_kv, block_kv)
                    plgpu.copy_gmem_to_smem(ref.at[w.batch, rows, w.kv_head], dst.at[slot], ready.at[slot])

                if w.col_src is None:
                    listed_block()
                    return
                pl.when(s < w.n_steps)(listed_block)

                @pl.when(s >= w.n_steps)
                def _():
                    plgpu.copy_gmem_to_smem(w.col_src(s - w.n_steps)[which], dst.at[slot], ready.at[slot])

            @pl.loop(0, total)
            def _(s):
                ring_step = s + base
                slot = lax.rem(ring_step, jnp.int32(stages))
                refill = ring_step >= stages  # the slot's previous tile must have been consumed
                pl.when(refill)(lambda: plgpu.barrier_wait(k_free.at[slot]))
                fetch(0, s, slot)
                pl.when(refill)(lambda: plgpu.barrier_wait(v_free.at[slot]))
                fetch(1, s, slot)

            return base + total

        items(item_body)


def _unmasked(step, s, carry):
    return step(s, carry, False)


def _masked(step, s, carry):
    return step(s, carry, True)


def _launch(body, inputs, out_types, *, grid, tuning, head_dim, dtype, with_lse, consumers=2, several_items=False):
    """Run ``body(refs, smem, barriers)`` as a ``plgpu.kernel`` of ``consumers`` compute warpgroups and
    one producer, with the shared scratch (``several_items``: two query buffers and an output buffer
    per compute warpgroup, as ``_pipeline`` runs several items)."""
    stages = tuning.stages
    q_buffers = 2 if several_items else 1
    tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    smem = [
        plgpu.SMEM((consumers, q_buffers, ROWS, head_dim), dtype, **tiled),
        plgpu.SMEM((consumers, ROWS, head_dim), dtype, **tiled) if several_items else None,
        plgpu.SMEM((stages, tuning.block_kv, head_dim), dtype, **tiled),
        plgpu.SMEM((stages, tuning.block_kv, head_dim), dtype, **tiled),
        plgpu.SMEM((consumers, ROWS), jnp.float32) if with_lse else None,
    ]

    def entry(*refs):
        pl.run_scoped(
            lambda *scratch: body(refs, scratch[0], scratch[1:]),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=consumers * q_buffers)),
            (plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=out_types,
        grid=grid,
        grid_names=("heads", "blocks", "batch"),
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*inputs)


def _pairing(group: int):
    """(query heads per CTA, query rows per CTA): two heads of a group, or two row halves of one head."""
    return (2, ROWS) if group % 2 == 0 else (1, 2 * ROWS)


def block_sizes(q_heads: int, kv_heads: int, tuning: Tuning) -> tuple[int, int, int]:
    """(block_q, block_kv, rows_block) of the static tables and the last-rows pass."""
    rows = _pairing(q_heads // kv_heads)[1]
    return rows, tuning.block_kv, rows


def attend(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, length: jax.Array, tuning: Tuning) -> jax.Array:
    """Run ``table`` over q ``[B, T, Hq, D]`` and k/v ``[B, T, Hkv, D]`` (``T = table.seq_len``; K and V
    through ``guards.guard_values``). ``length`` needs no care here: the table (or causality) hides
    every key past a row's length."""
    if table.dynamic:
        return _dynamic(q, k, v, table, tuning)
    return _static(q, k, v, table, tuning)


def _static(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, tuning: Tuning) -> jax.Array:
    """A static table whose query blocks are ``_pairing``'s rows: two heads of a group or two row halves."""
    if table.block_kv != tuning.block_kv:
        raise ValueError(f"the table's key blocks ({table.block_kv}) must be tuning.block_kv ({tuning.block_kv})")
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    heads_per_cta, rows_per_cta = _pairing(group)
    nq = table.num_q_blocks
    per_cta = min(tuning.items, nq)  # consecutive query blocks per CTA; the last CTA may run fewer

    def body(refs, smem, barriers):
        index_ref, first_ref, num_full_ref, num_steps_ref, q_ref, k_ref, v_ref, o_ref = refs
        first_qb, batch = lax.axis_index("blocks") * per_cta, lax.axis_index("batch")

        def work_of(wg, item):
            qb = first_qb + item
            first = first_ref[qb]
            if heads_per_cta == 2:
                head, row = 2 * lax.axis_index("heads") + wg, qb * ROWS
            else:
                head, row = lax.axis_index("heads"), qb * (2 * ROWS) + wg * ROWS
            tile = (batch, pl.ds(row, ROWS), head)
            return _Work(
                batch=batch, kv_head=lax.div(head, jnp.int32(group)), row=row,
                q_src=q_ref.at[tile], o_dst=o_ref.at[tile], lse_dst=None,
                n_full=num_full_ref[qb], n_steps=num_steps_ref[qb], kv_block=lambda s: index_ref[first + s],
            )

        _pipeline(
            work_of, k_ref, v_ref, smem, barriers, block_kv=tuning.block_kv, stages=tuning.stages,
            scale=d ** -0.5, n_init=table.n_init, n_local=table.n_local, dtype=q.dtype,
            n_items=None if per_cta == 1 else jnp.minimum(per_cta, nq - first_qb),
            sink_keys=tuning.sink_keys if table.n_local is not None and 0 < table.n_init <= tuning.sink_keys else 0,
            edges=tuning.edges,
        )

    arrays = table.arrays()
    inputs = (arrays["index"], arrays["first"], arrays["num_full"], arrays["num_steps"], q, k, v)
    return _launch(
        body, inputs, jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(hq // heads_per_cta, -(-nq // per_cta), b),
        tuning=tuning, head_dim=d, dtype=q.dtype, with_lse=False, several_items=per_cta > 1,
    )


def last_rows(q_rows: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, tuning: Tuning) -> jax.Array:
    """The triangle's dense last rows (``R`` rows per batch row from ``start[b]``) over every earlier
    key: one CTA per (KV chunk of ``tuning.kv_chunk``, row block), merged by log-sum-exp."""
    b, r, hq, d = q_rows.shape
    t = k.shape[1]
    group = hq // k.shape[2]
    heads_per_cta, rows_per_cta = _pairing(group)
    bkv = tuning.block_kv
    chunk_blocks = tuning.kv_chunk // bkv
    n_chunks = -(-t // tuning.kv_chunk)
    n_row_items = r // rows_per_cta

    def body(refs, smem, barriers):
        start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        item, batch = lax.axis_index("blocks"), lax.axis_index("batch")
        chunk, ri = lax.div(item, jnp.int32(n_row_items)), lax.rem(item, jnp.int32(n_row_items))
        first_row = start_ref[batch] + ri * rows_per_cta
        first = chunk * chunk_blocks
        last_needed = lax.div(first_row + rows_per_cta - 1, jnp.int32(bkv))
        n_steps = jnp.clip(last_needed + 1 - first, 0, chunk_blocks)
        n_full = jnp.clip(lax.div(first_row + 1, jnp.int32(bkv)) - first, 0, n_steps)

        def work_of(wg, item):
            del item  # one item per CTA
            if heads_per_cta == 2:
                head, local = 2 * lax.axis_index("heads") + wg, ri * rows_per_cta
            else:
                head, local = lax.axis_index("heads"), ri * rows_per_cta + wg * ROWS
            return _Work(
                batch=batch, kv_head=lax.div(head, jnp.int32(group)), row=start_ref[batch] + local,
                q_src=q_ref.at[batch, pl.ds(local, ROWS), head],
                o_dst=o_ref.at[chunk, batch, pl.ds(local, ROWS), head],
                lse_dst=lse_ref.at[chunk, batch, head, pl.ds(local, ROWS)],
                n_full=n_full, n_steps=n_steps, kv_block=lambda s: first + s,
            )

        _pipeline(
            work_of, k_ref, v_ref, smem, barriers, block_kv=bkv, stages=tuning.stages,
            scale=d ** -0.5, n_init=0, n_local=None, dtype=q_rows.dtype, edges=tuning.edges,
        )

    out_types = (
        jax.ShapeDtypeStruct((n_chunks, b, r, hq, d), q_rows.dtype),
        jax.ShapeDtypeStruct((n_chunks, b, hq, r), jnp.float32),
    )
    parts, lse = _launch(
        body, (start, q_rows, k, v), out_types,
        grid=(hq // heads_per_cta, n_row_items * n_chunks, b),
        tuning=tuning, head_dim=d, dtype=q_rows.dtype, with_lse=True,
    )
    merged = merge_partials(parts.astype(jnp.float32), lse.transpose(0, 1, 3, 2))
    return merged.astype(q_rows.dtype)


def _dynamic(q: jax.Array, k: jax.Array, v: jax.Array, table: Table, tuning: Tuning) -> jax.Array:
    """A dynamic table on the band pass's pipeline (64-row query blocks and 64-key blocks).

    A CTA takes one 64-row query block of two query heads that share a selection (an even number of
    query heads per selection head; the producer streams each K/V tile once for both) or of one head.
    Its steps are the table's key blocks (full ones, then the masked ones: the diagonal block), then
    the counted column chunks, whose K/V were gathered once per call into contiguous ``[B, H, V, D]``
    arrays so that every step is one TMA copy.
    """
    if table.block_q != ROWS or table.block_kv != ROWS:
        raise ValueError(f"mosaic_gpu runs dynamic tables of {ROWS}-token blocks, got {table.block_q} x {table.block_kv}")
    b, t, hq, d = q.shape
    hkv, hsel = k.shape[2], table.heads
    group = hq // hsel  # query heads per selection head
    bq = ROWS
    columns = table.columns is not None
    consumers = 2 if group % 2 == 0 else 1
    relative = table.relative

    def body(refs, smem, barriers):
        index_ref, first_ref, full_ref, steps_ref = refs[:4]
        chunks_ref, bits_ref = refs[4:6] if columns else (None, None)
        q_ref, k_ref, v_ref = refs[6:9] if columns else refs[4:7]
        kc_ref, vc_ref = refs[9:11] if columns else (None, None)
        o_ref = refs[-1]
        qb, batch = lax.axis_index("blocks"), lax.axis_index("batch")

        def work_of(wg, item):
            del item  # one item per CTA
            head = consumers * lax.axis_index("heads") + wg
            sel = lax.div(head, jnp.int32(group))
            first = first_ref[batch, sel, qb]
            tile = (batch, pl.ds(qb * ROWS, ROWS), head)

            def kv_block(s):
                entry = index_ref[batch, sel, first + s]
                return qb - entry if relative else entry

            column_phase = {}
            if columns:
                column_phase = dict(
                    n_cols=chunks_ref[batch, sel, qb],
                    col_src=lambda c: (kc_ref.at[batch, sel, pl.ds(c * bq, bq)], vc_ref.at[batch, sel, pl.ds(c * bq, bq)]),
                    col_bits=lambda c: (bits_ref[batch, sel, qb, 2 * c], bits_ref[batch, sel, qb, 2 * c + 1]),
                )
            return _Work(
                batch=batch, kv_head=lax.div(sel * hkv, jnp.int32(hsel)), row=qb * ROWS,
                q_src=q_ref.at[tile], o_dst=o_ref.at[tile], lse_dst=None,
                n_full=full_ref[batch, sel, qb], n_steps=steps_ref[batch, sel, qb], kv_block=kv_block,
                **column_phase,
            )

        _pipeline(
            work_of, k_ref, v_ref, smem, barriers, block_kv=bq, stages=tuning.stages, scale=d ** -0.5,
            n_init=table.n_init, n_local=table.n_local, dtype=q.dtype, consumers=consumers,
        )

    arrays = table.arrays()
    names = ("index", "first", "num_full", "num_steps") + (("n_chunks", "column_bits") if columns else ())
    inputs = tuple(arrays[n] for n in names) + (q, k, v)
    if columns:
        inputs += tuple(tables.gather_columns(x, table) for x in (k, v))
    return _launch(
        body, inputs, jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(hq // consumers, table.num_q_blocks, b),
        tuning=dataclasses.replace(tuning, block_kv=bq), head_dim=d, dtype=q.dtype, with_lse=False,
        consumers=consumers,
    )
