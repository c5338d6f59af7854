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
