"""Pallas Triton and TPU kernels in interpret mode (CPU) against dense float32 attention, and the
Mosaic GPU kernels lowered without a GPU.

Interpret mode is slow, so the shapes are small and few; the shared suite
(``tests/test_attention.py``) runs its own grid over these backends too. On CPU the tuning table's
``interpret`` entry runs them in the interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax import attention
from tmjax.pallas_kernels import dynamic_tables, reference
from tmjax.pallas_kernels.block_tables import band_table
from attention_fixtures import assert_matches, random_qkv

BACKENDS = ["triton", "tpu"]


@functools.partial(jax.jit, static_argnames=("name", "n_init", "n_local", "n_last"))
def _triangle(q, k, v, length, *, name, n_init, n_local, n_last):
    return tmjax.triangle_attention(
        q, k, v, n_init=n_init, n_local=n_local, n_last=n_last, length=length, implementation=name
    )


def _assert_close(out, ref, dtype):
    assert_matches(out, ref.astype(jnp.float32), dtype)


# (T, Hq, Hkv, D, n_init, n_local, n_last, dtype): ragged T with GQA 4 (the last rows overlap the
# band rows), GQA 7 with head_dim 128 and fp16, T shorter than n_init + n_last (all rows dense).
CASES = [
    (150, 4, 1, 64, 3, 20, 24, jnp.bfloat16),
    (90, 7, 1, 128, 5, 17, 20, jnp.float16),
    (40, 2, 2, 64, 8, 512, 128, jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d_H%d_KV%d_D%d" % c[:4])
@pytest.mark.parametrize("name", BACKENDS)
def test_triangle_matches_reference(name, case):
    t, hq, hkv, d, n_init, n_local, n_last, dtype = case
    q, k, v = random_qkv(0, 1, t, hq, hkv, d, dtype)
    out = _triangle(q, k, v, None, name=name, n_init=n_init, n_local=n_local, n_last=n_last)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, dtype)
    _assert_close(out, reference.masked_attention(q, k, v, reference.triangle_mask(t, n_init, n_local, n_last)), dtype)


@pytest.mark.parametrize("name", BACKENDS)
def test_traced_length_with_garbage_padding(name):
    """Batch 2, right-padded to T with large finite garbage: rows < length match the unpadded run,
    and the dense rows follow the traced length."""
    t, length, sizes = 120, 101, dict(n_init=2, n_local=16, n_last=12)
    q, k, v = random_qkv(1, 2, t, 4, 2, 64, jnp.bfloat16)
    pad = (jnp.arange(t) >= length)[None, :, None, None]
    q, k, v = (jnp.where(pad, 300 * x, x) for x in (q, k, v))
    out = _triangle(q, k, v, jnp.int32(length), name=name, **sizes)[:, :length]
    q, k, v = (x[:, :length] for x in (q, k, v))
    _assert_close(out, reference.masked_attention(q, k, v, reference.triangle_mask(length, **sizes)), jnp.bfloat16)


@pytest.mark.parametrize("name", BACKENDS)
def test_causal_matches_reference(name):
    q, k, v = random_qkv(2, 1, 70, 8, 2, 64, jnp.bfloat16)
    out = jax.jit(functools.partial(tmjax.causal_attention, implementation=name))(q, k, v)
    _assert_close(out, reference.masked_attention(q, k, v, reference.causal_mask(70)), jnp.bfloat16)


@pytest.mark.parametrize("name", BACKENDS)
def test_unlisted_blocks_are_never_read(name):
    """K/V set to NaN outside the blocks one table row lists leave that query block's rows unchanged."""
    t, hq, hkv, d, sizes = 160, 4, 2, 64, dict(n_init=3, n_local=20, n_last=16)
    q, k, v = random_qkv(3, 1, t, hq, hkv, d, jnp.bfloat16)
    run = attention.kernel(name, "triangle", q, k, v)  # the blocks the dispatch's table uses
    block_q = run.block_q
    table = band_table(run.padded(t), block_q, run.block_kv, n_init=sizes["n_init"], n_local=sizes["n_local"])
    clean = np.asarray(_triangle(q, k, v, None, name=name, **sizes), np.float32)
    q_block = (t - sizes["n_last"]) // block_q - 1  # the last block of rows that are all band rows
    listed = table.listed_keys(q_block)[:t]
    assert listed.sum() < t // 2  # the test poisons most of the sequence
    poisoned = [jnp.where(jnp.asarray(listed)[None, :, None, None], x, jnp.nan) for x in (k, v)]
    out = np.asarray(_triangle(q, *poisoned, None, name=name, **sizes), np.float32)
    rows = slice(q_block * block_q, (q_block + 1) * block_q)
    assert np.isfinite(out[:, rows]).all()
    np.testing.assert_array_equal(out[:, rows], clean[:, rows])
    assert np.isnan(out).any()  # rows outside that block did read the poison


@pytest.mark.parametrize("name", BACKENDS + ["mosaic_gpu"])
@pytest.mark.parametrize(
    "shape, dtype, needle",
    [((1, 8, 2, 64), jnp.float32, "bfloat16 and float16"), ((1, 8, 2, 96), jnp.bfloat16, "head_dim")],
)
def test_unsupported_inputs_raise(name, shape, dtype, needle):
    q = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match=needle):
        tmjax.triangle_attention(q, q, q, n_init=1, n_local=4, n_last=2, implementation=name)


@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(8, 2, 128), (7, 1, 64)])
def test_mosaic_gpu_kernels_lower_on_cpu(q_heads, kv_heads, head_dim):
    """The Mosaic GPU kernels lower to Mosaic GPU modules without a GPU (layouts, shared memory,
    barrier use; not ptxas). Both warpgroup pairings: two heads of a group (G even) and two row
    halves of one head (G odd)."""
    q = jax.ShapeDtypeStruct((1, 1000, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, kv_heads, head_dim), jnp.bfloat16)
    length = jax.ShapeDtypeStruct((), jnp.int32)
    tri = functools.partial(tmjax.triangle_attention, n_init=8, n_local=512, n_last=128, implementation="mosaic_gpu")
    text = jax.jit(tri).trace(q, kv, kv, length=length).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2  # the band and last-rows kernels
    assert "wgmma.mma_async" in text


@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(8, 2, 128), (7, 1, 64)])
def test_mosaic_gpu_several_query_blocks_per_cta_lower_on_cpu(q_heads, kv_heads, head_dim):
    """``Tuning.items=3`` (the K/V ring and double-buffered queries running on over three query blocks;
    16 or 8 blocks leave a shorter last CTA) lowers for the band and the causal table, both pairings."""
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    q = jax.ShapeDtypeStruct((1, 1000, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, kv_heads, head_dim), jnp.bfloat16)
    tuning = Tuning(block_kv=64, stages=3, items=3)
    for fn, kernels in ((functools.partial(tmjax.triangle_attention, n_init=8, n_local=512, n_last=128), 2),
                        (tmjax.causal_attention, 1)):
        text = jax.jit(functools.partial(fn, implementation="mosaic_gpu", tuning=tuning)).trace(q, kv, kv).lower(
            lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu") == kernels
        assert "wgmma.mma_async" in text


@pytest.mark.parametrize("q_heads, kv_heads, head_dim, items", [(8, 2, 128, 1), (7, 1, 64, 4)])
def test_mosaic_gpu_narrow_sink_steps_lower_on_cpu(q_heads, kv_heads, head_dim, items):
    """``Tuning(block_kv=128, sink_keys=64)``: the band kernel's 64-key sink step (its own QK and PV
    products on the first half of the K/V tiles) lowers for both pairings, with one and several items."""
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    q = jax.ShapeDtypeStruct((1, 1000, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, kv_heads, head_dim), jnp.bfloat16)
    narrow = Tuning(block_kv=128, stages=2, items=items, sink_keys=64)
    texts = [jax.jit(functools.partial(tmjax.triangle_attention, implementation="mosaic_gpu", tuning=tuning))
             .trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
             for tuning in (narrow, dataclasses.replace(narrow, sink_keys=0))]
    assert [t.count("stablehlo.custom_call @mosaic_gpu") for t in texts] == [2, 2]
    assert texts[0].count("wgmma.mma_async") > texts[1].count("wgmma.mma_async")  # the sink step's own products


@pytest.mark.parametrize("t, n_init, n_local, block_q", [(4096, 8, 512, 64), (4096, 8, 512, 128), (1000, 0, 100, 64),
                                                          (1000, 70, 300, 128), (1000, 8, None, 64), (777, 0, None, 128),
                                                          (1000, 8, 129, 64), (1000, 0, 130, 128)])
def test_mosaic_gpu_edge_halves_skip_only_invisible_halves(t, n_init, n_local, block_q):
    """``mosaic_gpu.edge_halves`` over every warpgroup of a band (or causal: ``n_local=None``) table with
    128-key blocks: a half it skips holds no key visible to any of the warpgroup's rows under the mask
    recomputed from its definition; and in the band's interior (past the window and the sinks) every
    64-row warpgroup skips exactly one half (the window's first block or the diagonal block). The masked
    steps start after the kernel's sink step (``sink_keys=64``), which ``mosaic_gpu.sink_steps`` takes
    exactly when key block 0 is the first partial step and no row sees a key of it past the sinks."""
    from tmjax.pallas_kernels import block_tables, reference
    from tmjax.pallas_kernels.mosaic_gpu import ROWS, edge_halves, sink_steps

    table = block_tables.block_table(t, block_q, 128, n_init=n_init, n_local=n_local)
    mask = reference.triangle_mask(t, n_init, n_local, 0) if n_local else reference.causal_mask(t)
    mask = np.pad(mask, ((0, 2 * block_q), (0, 256)))  # padded rows and keys: invisible
    skipped = []
    for qb in range(table.kv_index.shape[0]):
        for row in range(qb * block_q, (qb + 1) * block_q, ROWS):
            full, steps = int(table.num_full[qb]), int(table.num_steps[qb])
            blocks = table.kv_index[qb, :steps]
            rows = mask[row:row + ROWS]
            sink_step = 0
            if n_local is not None and 0 < n_init <= 64:  # the kernel's own rule, with sink_keys=64
                sink_step = int(sink_steps(np.int32(row), np.int32(full), np.int32(steps),
                                           blocks[min(full, steps - 1)], block_kv=128, n_local=n_local))
                # taken exactly when block 0 is the first partial step and no row sees a key of it past the sinks
                narrow_fits = full < steps and blocks[full] == 0 and not rows[:, n_init:128].any()
                assert sink_step == narrow_fits if row + ROWS <= t else sink_step <= narrow_fits, (row, blocks)
            first = full + sink_step
            high, low = edge_halves(np.int32(row), blocks[min(first, steps - 1)], blocks[steps - 1],
                                    np.int32(steps - first), block_kv=128, n_init=n_init, n_local=n_local)
            if steps > first:  # a half is skipped exactly when no row sees a key in it (when some rows are
                # padding, which the kernel treats as rows, only: skipped -> invisible)
                high_invisible = not rows[:, blocks[first] * 128:blocks[first] * 128 + 64].any()
                low_invisible = not rows[:, blocks[-1] * 128 + 64:blocks[-1] * 128 + 128].any()
                low_invisible = low_invisible and steps - first - high >= 1  # the low step is not the high one
                if row + ROWS <= t:
                    assert (high, low) == (high_invisible, low_invisible), (row, blocks)
                else:
                    assert high <= high_invisible and low <= low_invisible, (row, blocks)
            else:
                assert high == low == 0
            skipped.append((row, int(high) + int(low)))
    interior = [n for row, n in skipped if row >= (n_local or 0) + 128 + n_init and row + ROWS <= t]
    assert interior
    if n_local is not None and n_local % 128 == 0:
        assert set(interior) == {1}
    else:
        assert 1 in interior  # some warpgroups skip a half


def test_mosaic_gpu_edge_halves_at_any_first_row():
    """The last-rows pass starts its rows anywhere (``length - n_last``): for every first row, the last
    128-key block its 64 rows need is cut to its first half exactly when no row sees its second half."""
    from tmjax.pallas_kernels import reference
    from tmjax.pallas_kernels.mosaic_gpu import ROWS, edge_halves

    mask = np.pad(reference.causal_mask(700), ((0, ROWS), (0, 128)))
    for row in range(700 - ROWS):
        last = (row + ROWS - 1) // 128
        _, low = edge_halves(np.int32(row), last, last, np.int32(2), block_kv=128, n_init=0, n_local=None)
        assert low == (not mask[row:row + ROWS, last * 128 + 64:last * 128 + 128].any()), row


@pytest.mark.parametrize("q_heads, kv_heads, head_dim, items", [(8, 2, 128, 1), (7, 1, 64, 4)])
def test_mosaic_gpu_edge_steps_lower_on_cpu(q_heads, kv_heads, head_dim, items):
    """``Tuning(block_kv=128, edges=True)``: the half-block edge steps (their own QK and PV products on one
    half of the K/V tiles, the second half at an offset) lower for the band, last rows and causal
    kernels, both pairings, with one and several items, with and without sink steps."""
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    q = jax.ShapeDtypeStruct((1, 1000, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, kv_heads, head_dim), jnp.bfloat16)
    base = Tuning(block_kv=128, stages=2, items=items)
    for sinks in (0, 64):
        tunings = (dataclasses.replace(base, sink_keys=sinks, edges=True), dataclasses.replace(base, sink_keys=sinks))
        for fn, kernels in ((functools.partial(tmjax.triangle_attention, n_init=8, n_local=512, n_last=128), 2),
                            (tmjax.causal_attention, 1)):
            texts = [jax.jit(functools.partial(fn, implementation="mosaic_gpu", tuning=tuning)).trace(q, kv, kv)
                     .lower(lowering_platforms=("cuda",)).as_text() for tuning in tunings]
            assert [text.count("stablehlo.custom_call @mosaic_gpu") for text in texts] == [kernels, kernels]
            assert texts[0].count("wgmma.mma_async") > texts[1].count("wgmma.mma_async")  # the edge steps' products


@pytest.mark.parametrize("block_kv, edges", [(64, True), (128, 2), (128, "yes")])
def test_mosaic_gpu_tuning_refuses_edges_without_halves(block_kv, edges):
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    with pytest.raises(ValueError, match="edges"):
        Tuning(block_kv=block_kv, edges=edges)


@pytest.mark.parametrize("block_kv, sink_keys", [(128, 16), (64, 64), (128, 128), (128, -64)])
def test_mosaic_gpu_tuning_refuses_sink_keys_the_products_cannot_take(block_kv, sink_keys):
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    with pytest.raises(ValueError, match="sink_keys must be 0 or a multiple of 64"):
        Tuning(block_kv=block_kv, sink_keys=sink_keys)


def test_mosaic_gpu_guard_nonfinite_lowers_on_cpu():
    """``Tuning(guard="nonfinite")``: one conditional on V's finiteness, each branch with the band and
    last-rows kernels (the guarded branch runs them on ``guard_values``' K and V)."""
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    q = jax.ShapeDtypeStruct((1, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    fn = functools.partial(tmjax.triangle_attention, implementation="mosaic_gpu", tuning=Tuning(64, 3, guard="nonfinite"))
    text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.case") == 1
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 4


@pytest.mark.parametrize("backend", ["mosaic_gpu", "xla"])
def test_tuning_refuses_an_unknown_guard(backend):
    module = importlib.import_module(f"tmjax.pallas_kernels.{backend}")
    with pytest.raises(ValueError, match="guard must be one of"):
        module.Tuning(guard="sometimes")


@pytest.mark.parametrize("items", [0, -1, 2.0])
def test_mosaic_gpu_tuning_refuses_bad_items(items):
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    with pytest.raises(ValueError, match="items must be a positive int"):
        Tuning(items=items)


@pytest.mark.parametrize("q_heads, kv_heads, head_dim, heads_selected", [(8, 2, 128, 2), (7, 1, 64, 1), (4, 1, 64, 4)],
                         ids=["two_warpgroups", "one_warpgroup", "per_head_selection"])
def test_mosaic_gpu_vertical_slash_lowers_on_cpu(q_heads, kv_heads, head_dim, heads_selected):
    """The Mosaic GPU vertical-slash kernel lowers for sm_90 with two compute warpgroups sharing a
    selection (even group size) and with one (odd group size, per-head selection)."""
    q = jax.ShapeDtypeStruct((2, 1000, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, kv_heads, head_dim), jnp.bfloat16)
    cols, diags = (jax.ShapeDtypeStruct((2, heads_selected, n), jnp.int32) for n in (100, 50))

    def fn(q, k, v, c, d, lengths):
        table = dynamic_tables.vertical_slash(c, d, lengths, 1024)
        return attention.attend_table(q, k, v, table, length=lengths, implementation="mosaic_gpu")

    text = jax.jit(fn).trace(q, kv, kv, cols, diags, jax.ShapeDtypeStruct((2,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert "wgmma.mma_async" in text


@pytest.mark.parametrize("q_heads, kv_heads, heads_selected", [(8, 2, 2), (7, 1, 7)], ids=["two_warpgroups", "one_warpgroup"])
def test_mosaic_gpu_block_lists_lower_on_cpu(q_heads, kv_heads, heads_selected):
    """A dynamic table of explicit key-block lists (no column phase; FlexPrefill's query-aware heads
    at block 64) lowers for sm_90 on the same kernel."""
    q = jax.ShapeDtypeStruct((2, 1000, q_heads, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1000, kv_heads, 128), jnp.bfloat16)
    blocks = jax.ShapeDtypeStruct((2, heads_selected, 16, 5), jnp.int32)

    def fn(q, k, v, blocks, lengths):
        table = dynamic_tables.block_lists(blocks, lengths, 1024, 64)
        return attention.attend_table(q, k, v, table, length=lengths, implementation="mosaic_gpu")

    text = jax.jit(fn).trace(q, kv, kv, blocks, jax.ShapeDtypeStruct((2,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert "wgmma.mma_async" in text
