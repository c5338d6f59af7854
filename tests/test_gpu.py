"""GPU-only: every attention implementation against the dense float32 reference over the shape grid.

Skipped without a CUDA GPU. Set ``TMJAX_ERRORS_JSON=path`` to record each case's error figures
(``bench/gpu_check.sh`` does, into ``bench/results/``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax import attention
from tmjax.pallas_kernels import dynamic_tables, reference
from tmjax.pallas_kernels.block_tables import band_table
from attention_fixtures import REL_L2, random_qkv

ON_GPU = jax.devices()[0].platform == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]


def _pallas_impls() -> list[str]:
    """Triton on every CUDA GPU, Mosaic GPU on Hopper (compute capability 9.x)."""
    if not ON_GPU:
        return ["triton"]
    hopper = str(getattr(jax.devices()[0], "compute_capability", "0")).startswith("9")
    return ["triton", "mosaic_gpu"] if hopper else ["triton"]


PALLAS = _pallas_impls()
IMPLS = ["xla"] + PALLAS
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}
SIZES = dict(n_init=8, n_local=512, n_last=128)
_records: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_records():
    yield
    path = os.environ.get("TMJAX_ERRORS_JSON")
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # under pytest-xdist each worker writes its own file
    if path and worker:
        path = f"{os.path.splitext(path)[0]}-{worker}.json"
    if path and _records:
        with open(path, "w") as fh:
            info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": _records}
            json.dump(info, fh, indent=1)


@functools.partial(jax.jit, static_argnames=("impl", "n_init", "n_local", "n_last"))
def _triangle(q, k, v, length, *, impl, n_init, n_local, n_last):
    return tmjax.triangle_attention(
        q, k, v, n_init=n_init, n_local=n_local, n_last=n_last, length=length, implementation=impl
    )


@functools.partial(jax.jit, static_argnames=("impl",))
def _causal(q, k, v, *, impl):
    return tmjax.causal_attention(q, k, v, implementation=impl)


_reference = jax.jit(reference.masked_attention)


def _check(name, impl, dtype_name, out, ref, rows):
    """Record max-abs error (relative to the reference's max) and relative L2 error; assert the latter
    (the bounds and why: ``attention_fixtures``)."""
    out = np.asarray(out[:, :rows], np.float32)
    ref = np.asarray(ref[:, :rows], np.float32)
    scale = float(np.abs(ref).max())
    diff = out - ref
    _records.append(dict(
        case=name, impl=impl, dtype=dtype_name,
        max_err_rel=float(np.abs(diff).max()) / scale,
        rel_l2=float(np.linalg.norm(diff) / np.linalg.norm(ref)),
    ))
    assert np.isfinite(out).all(), f"{name} {impl}: non-finite output"
    bound = REL_L2[jnp.dtype(DTYPES[dtype_name]).name]
    assert _records[-1]["rel_l2"] <= bound, f"{name} {impl} {dtype_name}: relative L2 {_records[-1]['rel_l2']:.2e} > {bound}"


# (T, Hq, Hkv, D): T a multiple of no block size, GQA 1, 4, 7, head_dim 64 and 128; SmolLM2's heads
# (GQA 3, head_dim 64: the tuning table's own entry on the H100); then T shorter than the window, and T
# shorter than n_init + n_last (every row dense).
GRID = [(1000, h * g, h, d) for g, h in ((1, 4), (4, 2), (7, 1)) for d in (64, 128)]
GRID += [(1000, 9, 3, 64), (300, 8, 2, 128), (100, 7, 1, 64)]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "T%d_H%d_KV%d_D%d" % s)
@pytest.mark.parametrize("impl", IMPLS)
def test_triangle_grid(impl, shape, dtype_name):
    t, hq, hkv, d = shape
    q, k, v = random_qkv(0, 2, t, hq, hkv, d, DTYPES[dtype_name])
    out = _triangle(q, k, v, None, impl=impl, **SIZES)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, q.dtype)
    ref = _reference(q, k, v, reference.triangle_mask(t, **SIZES))
    _check("triangle_T%d_H%d_KV%d_D%d" % shape, impl, dtype_name, out, ref, t)


# Issue 17: without sinks, rows whose first listed key block is wholly masked (a window shorter than
# the key block) came out NaN on mosaic_gpu at head_dim 64: the finite mask value scaled inside an FMA.
NO_SINK_CASES = [(515, 7, 1, 64, 1), (512, 8, 1, 64, 2), (515, 4, 1, 64, 1), (515, 7, 7, 64, 1), (515, 7, 1, 128, 1)]


@pytest.mark.parametrize("case", NO_SINK_CASES, ids=lambda c: "T%d_H%d_KV%d_D%d_last%d" % c)
@pytest.mark.parametrize("impl", IMPLS)
def test_triangle_without_sinks(impl, case):
    t, hq, hkv, d, n_last = case
    q, k, v = random_qkv(17, 1, t, hq, hkv, d, jnp.bfloat16)
    sizes = dict(n_init=0, n_local=100, n_last=n_last)
    out = _triangle(q, k, v, None, impl=impl, **sizes)
    ref = _reference(q, k, v, reference.triangle_mask(t, **sizes))
    _check("triangle_nosink_T%d_H%d_KV%d_D%d_last%d" % case, impl, "bf16", out, ref, t)


@pytest.mark.parametrize("heads", [(8, 2, 128), (9, 3, 64)], ids=lambda h: "H%d_KV%d_D%d" % h)
@pytest.mark.parametrize("impl", IMPLS)
def test_triangle_traced_length_ignores_padding(impl, heads):
    """Right-padded inputs with large garbage in the padding: rows < length match the unpadded
    reference (the padding's K/V are finite, as a model's are, but far off the real scale)."""
    t, length = 1000, 777
    q, k, v = random_qkv(1, 2, t, *heads, jnp.bfloat16)
    pad = (jnp.arange(t) >= length)[None, :, None, None]
    q, k, v = (jnp.where(pad, 300 * x, x) for x in (q, k, v))
    out = _triangle(q, k, v, jnp.int32(length), impl=impl, **SIZES)
    mask = reference.triangle_mask(length, **SIZES)
    ref = _reference(q[:, :length], k[:, :length], v[:, :length], mask)
    _check("triangle_T1000_length777_padded_H%d_KV%d_D%d" % heads, impl, "bf16", out, ref, length)


@pytest.mark.parametrize("shape", [(1000, 4, 4, 128), (1000, 8, 2, 64), (1000, 7, 1, 128)], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_causal(impl, shape):
    t, hq, hkv, d = shape
    q, k, v = random_qkv(2, 2, t, hq, hkv, d, jnp.bfloat16)
    out = _causal(q, k, v, impl=impl)
    ref = _reference(q, k, v, reference.causal_mask(t))
    _check("causal_T%d_H%d_KV%d_D%d" % shape, impl, "bf16", out, ref, t)


def _check_rows(name, out, q, k, v, lengths, mask_of):
    """``_check`` (mosaic_gpu, bf16) of each batch row's first ``lengths[row]`` rows against the reference
    on that row alone, under ``mask_of(length)``."""
    for row, n in enumerate(lengths):
        ref = _reference(q[row:row + 1, :n], k[row:row + 1, :n], v[row:row + 1, :n], mask_of(n))
        _check(f"{name}_length{n}", "mosaic_gpu", "bf16", out[row:row + 1], ref, n)


# Several query blocks per CTA (mosaic_gpu's Tuning.items): the K/V ring and the query buffers run on
# from one block to the next. 1000 tokens are 16 blocks of 64 rows (an even group: two heads per CTA) or
# 8 of 128 (an odd group: two row halves), so 3 per CTA leaves a shorter last CTA; batch 2 with a traced
# length per row; bkv 128 / 2 stages and bkv 64 / 3 stages (the triangle's table entry).
ITEMS_CASES = [(3, 64, 3, (8, 2, 128)), (3, 128, 2, (7, 1, 64)), (2, 64, 3, (9, 3, 64)), (4, 128, 2, (4, 4, 128))]


@pytest.mark.skipif("mosaic_gpu" not in PALLAS, reason="needs a Hopper GPU (mosaic_gpu)")
@pytest.mark.parametrize("case", ITEMS_CASES, ids=lambda c: "items%d_bkv%d_st%d_H%d_KV%d_D%d" % (*c[:3], *c[3]))
def test_several_query_blocks_per_cta(case):
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    items, block_kv, stages, heads = case
    _check_triangle_and_causal("items%d_bkv%d_st%d_H%d_KV%d_D%d" % (*case[:3], *heads), heads, 8,
                               Tuning(block_kv, stages, 2048, items))


def _check_triangle_and_causal(name, heads, seed, tuning, sizes=SIZES):
    """Triangle (``sizes``) and causal attention on mosaic_gpu with ``tuning`` (the causal table without sink
    steps), batch 2 of lengths 1000 and 811 (traced), each row against the dense float32 reference."""
    t, lengths = 1000, (1000, 811)
    q, k, v = random_qkv(seed, 2, t, *heads, jnp.bfloat16)
    traced = jnp.asarray(lengths, jnp.int32)
    triangle = jax.jit(lambda q, k, v, n: tmjax.triangle_attention(
        q, k, v, **sizes, length=n, implementation="mosaic_gpu", tuning=tuning))
    causal = jax.jit(lambda q, k, v, n: tmjax.causal_attention(
        q, k, v, length=n, implementation="mosaic_gpu", tuning=dataclasses.replace(tuning, sink_keys=0)))
    for pattern, run, mask_of in (("triangle", triangle, lambda n: reference.triangle_mask(n, **sizes)),
                                  ("causal", causal, reference.causal_mask)):
        _check_rows(f"{pattern}_{name}", run(q, k, v, traced), q, k, v, lengths, mask_of)


# A narrow sink step (mosaic_gpu Tuning(block_kv=128, sink_keys=64)): at T=1000 the query blocks from row
# 639 on (n_local 512 + 127) see only the sinks in key block 0; both pairings, one and several items,
# lengths per row; sinks at the step's limit (64), none (0: no narrow step) and past it (70: whole blocks).
SINK_CASES = [((8, 2, 128), 1, 8), ((8, 2, 128), 4, 64), ((7, 1, 64), 1, 8), ((9, 3, 64), 4, 8), ((8, 2, 128), 1, 0),
              ((8, 2, 128), 1, 70)]


@pytest.mark.skipif("mosaic_gpu" not in PALLAS, reason="needs a Hopper GPU (mosaic_gpu)")
@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: "H%d_KV%d_D%d_items%d_init%d" % (*c[0], c[1], c[2]))
def test_narrow_sink_steps(case):
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    heads, items, n_init = case
    t, lengths = 1000, (1000, 811)
    sizes = dict(SIZES, n_init=n_init)
    tuning = Tuning(block_kv=128, stages=2, items=items, sink_keys=64)
    q, k, v = random_qkv(9, 2, t, *heads, jnp.bfloat16)
    out = jax.jit(lambda q, k, v, n: tmjax.triangle_attention(
        q, k, v, **sizes, length=n, implementation="mosaic_gpu", tuning=tuning))(q, k, v, jnp.asarray(lengths, jnp.int32))
    _check_rows("sinks_H%d_KV%d_D%d_items%d_init%d" % (*heads, items, n_init), out, q, k, v, lengths,
                lambda n: reference.triangle_mask(n, **sizes))


# Half-block edge steps (mosaic_gpu Tuning(block_kv=128, edges=True)): the window's first block and the diagonal
# block of a 64-row warpgroup on one 64-key half; both pairings, one and several items, with and without sink steps,
# a window that is not a multiple of 128 (the halves then fall elsewhere), lengths per row (the last rows then start
# anywhere); the triangle and the causal table.
EDGE_CASES = [((8, 2, 128), 1, 64, 512), ((8, 2, 128), 4, 64, 512), ((9, 3, 64), 4, 64, 512), ((7, 1, 64), 1, 0, 512),
              ((8, 2, 128), 1, 64, 300), ((9, 3, 64), 1, 0, 129)]


@pytest.mark.skipif("mosaic_gpu" not in PALLAS, reason="needs a Hopper GPU (mosaic_gpu)")
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "H%d_KV%d_D%d_items%d_sinks%d_local%d" % (*c[0], *c[1:]))
def test_edge_steps(case):
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    heads, items, sinks, n_local = case
    _check_triangle_and_causal("edges_H%d_KV%d_D%d_items%d_sinks%d_local%d" % (*heads, items, sinks, n_local), heads, 10,
                               Tuning(block_kv=128, stages=2, items=items, sink_keys=sinks, edges=True),
                               dict(SIZES, n_local=n_local))


@pytest.mark.skipif("mosaic_gpu" not in PALLAS, reason="needs a Hopper GPU (mosaic_gpu)")
def test_mosaic_gpu_guard_only_for_nonfinite_values():
    """``Tuning(guard="nonfinite")``: finite inputs with garbage in the padding give rows before their length
    bit for bit the output of the always-guarded run; NaN in V (padding and one real key) reaches exactly
    the rows that see the key (the guard ran)."""
    from test_attention import assert_only_seeing_rows_change, poison
    from tmjax.pallas_kernels.mosaic_gpu import Tuning

    t, lengths, key = 1000, (1000, 777), 300
    q, k, v = random_qkv(7, 2, t, 8, 2, 128, jnp.bfloat16)
    padding = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]
    k, v = poison(k, padding, 40.0), poison(v, padding, 300.0)
    traced = jnp.asarray(lengths, jnp.int32)
    runs = {}
    for when in ("always", "nonfinite"):
        tuning = attention.kernel("mosaic_gpu", "triangle", q, k, v).tuning
        tri = jax.jit(lambda q, k, v, n, tuning=dataclasses.replace(tuning, guard=when): tmjax.triangle_attention(
            q, k, v, **SIZES, length=n, implementation="mosaic_gpu", tuning=tuning))
        causal = jax.jit(lambda q, k, v, n, tuning=Tuning(guard=when): tmjax.causal_attention(
            q, k, v, length=n, implementation="mosaic_gpu", tuning=tuning))
        runs[when] = (tri, causal)
    for fast, guarded in zip(runs["nonfinite"], runs["always"]):
        out, want = np.asarray(fast(q, k, v, traced), np.float32), np.asarray(guarded(q, k, v, traced), np.float32)
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(out[b, :n], want[b, :n])
    bad_v = poison(v, padding | (np.arange(t) == key)[None, :], np.nan)
    tri, causal = runs["nonfinite"]
    sees = np.stack([np.pad(reference.triangle_mask(n, **SIZES)[:, key], (0, t - n)) for n in lengths])
    assert_only_seeing_rows_change(tri(q, k, v, traced), tri(q, k, bad_v, traced), sees, lengths)
    sees = np.broadcast_to(np.arange(t) >= key, (2, t))
    assert_only_seeing_rows_change(causal(q, k, v, traced), causal(q, k, bad_v, traced), sees, lengths)


@pytest.mark.parametrize("impl", PALLAS)
def test_unlisted_blocks_are_never_read(impl):
    """K/V set to NaN outside the blocks a query block's table row lists leave its rows unchanged."""
    t, hq, hkv, d = 4096, 8, 2, 128
    q, k, v = random_qkv(3, 1, t, hq, hkv, d, jnp.bfloat16)
    run = attention.kernel(impl, "triangle", q, k, v)  # the backend and tuning the dispatch runs
    block_q = run.block_q
    table = band_table(run.padded(t), block_q, run.block_kv, n_init=SIZES["n_init"], n_local=SIZES["n_local"])
    clean = np.asarray(_triangle(q, k, v, None, impl=impl, **SIZES), np.float32)
    for q_block in (3, (t - SIZES["n_last"]) // block_q - 1):
        listed = jnp.asarray(table.listed_keys(q_block)[:t])[None, :, None, None]
        assert not bool(listed.all())
        poisoned = [jnp.where(listed, x, jnp.nan) for x in (k, v)]
        out = np.asarray(_triangle(q, *poisoned, None, impl=impl, **SIZES), np.float32)
        rows = slice(q_block * block_q, (q_block + 1) * block_q)
        assert np.isfinite(out[:, rows]).all()
        np.testing.assert_array_equal(out[:, rows], clean[:, rows])


VS_SHAPES = [(4096, 32, 8, 128, "group"), (4000, 9, 3, 64, "group"), (2000, 8, 2, 128, "head")]


@pytest.mark.parametrize("shape", VS_SHAPES, ids=lambda s: "T%d_H%d_KV%d_D%d_%s" % s)
@pytest.mark.parametrize("impl", IMPLS)
def test_vertical_slash(impl, shape):
    """Vertical-slash kernels vs dense float32 attention under the contract's mask (hand-built sparse
    columns and diagonals; B = 2 with the second sequence right-padded)."""
    from test_vertical_slash import _reference, sparse_indices

    t, hq, hkv, d, selection = shape
    lengths = (t, t - 333)
    q, k, v = random_qkv(5, 2, t, hq, hkv, d, jnp.bfloat16)
    cols, diags = sparse_indices(1, hkv if selection == "group" else hq, t, lengths, 300, 40)
    def attend(q, k, v, cols, diags, lengths):
        table = dynamic_tables.vertical_slash(cols, diags, lengths, -(-t // 64) * 64)
        return attention.attend_table(q, k, v, table, length=lengths, implementation=impl)

    fn = jax.jit(attend)
    out = fn(q, k, v, cols, diags, jnp.asarray(lengths))
    ref = _reference(q, k, v, np.asarray(cols), np.asarray(diags), lengths)
    for b, length in enumerate(lengths):
        _check("vertical_slash_T%d_H%d_KV%d_D%d_%s" % shape + f"_row{b}", impl, "bf16", out[b:b + 1], ref[b:b + 1], length)


LIST_SHAPES = [(1000, 16, 4, 128, 4), (1000, 9, 3, 64, 9)]  # two warpgroups sharing a selection; one


@pytest.mark.parametrize("shape", LIST_SHAPES, ids=lambda s: "T%d_H%d_KV%d_D%d_sel%d" % s)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_lists(impl, shape):
    """Dynamic tables of explicit 64-token key-block lists (the format FlexPrefill's query-aware heads
    plug into) vs dense float32 attention under the mask recomputed from the blocks; B = 2, the
    second sequence right-padded."""
    from test_tables import _made_up_blocks, _recomputed_mask

    t, hq, hkv, d, heads = shape
    lengths, block = (t, t - 333), 64
    nq = -(-t // block)
    q, k, v = random_qkv(8, 2, t, hq, hkv, d, jnp.bfloat16)
    blocks = _made_up_blocks(9, 2, heads, nq, 6)

    def attend(q, k, v, blocks, lengths):
        table = dynamic_tables.block_lists(blocks, lengths, nq * block, block)
        return attention.attend_table(q, k, v, table, length=lengths, implementation=impl)

    out = jax.jit(attend)(q, k, v, jnp.asarray(blocks), jnp.asarray(lengths))
    masks = np.zeros((2, hq, t, t), bool)
    for b, length in enumerate(lengths):
        for h in range(heads):
            masks[b, h * hq // heads:(h + 1) * hq // heads] = _recomputed_mask(blocks[b, h], length, nq * block, block)[:t, :t]
    ref = _reference(q, k, v, masks)
    for b, length in enumerate(lengths):
        _check("block_lists_T%d_H%d_KV%d_D%d_sel%d" % shape + f"_row{b}", impl, "bf16", out[b:b + 1], ref[b:b + 1], length)


FLEX_SHAPES = [(4000, 32, 8, 128, 128, "group"), (3000, 9, 3, 64, 64, "head"), (2500, 7, 1, 128, 192, "group")]


@pytest.mark.parametrize("shape", FLEX_SHAPES, ids=lambda s: "T%d_H%d_KV%d_D%d_b%d_%s" % s)
@pytest.mark.parametrize("impl", IMPLS)
def test_flexprefill(impl, shape):
    """``flexprefill_attention`` (guard off) vs dense float32 attention under ``flexprefill.mask`` of the
    selection it returns; tau between the heads' distances so that both classes run; B = 2, the second
    sequence right-padded with NaN."""
    from tmjax.pallas_kernels import flexprefill

    t, hq, hkv, d, block, selection = shape
    lengths = jnp.asarray((t, t - 333))
    q, k, v = random_qkv(6, 2, t, hq, hkv, d, jnp.bfloat16)
    dist = np.sort(np.asarray(flexprefill.distances(q, k, block=block, length=lengths, selection=selection)).ravel())
    pattern = tmjax.FlexPrefill(gamma=0.7, tau=float(dist[len(dist) // 2 - 1] + dist[len(dist) // 2]) / 2,
                                block=block, max_blocks=8, vertical=100, slash=200, force_vertical=4,
                                force_slash=8, selection=selection, guard=False)
    pad = (np.arange(t)[None, :] >= np.asarray(lengths)[:, None])[:, :, None, None]
    poisoned = [jnp.where(pad, jnp.nan, x) for x in (q, k, v)]
    out, sel = jax.jit(lambda q, k, v: tmjax.flexprefill_attention(
        q, k, v, pattern, length=lengths, implementation=impl, return_selection=True))(*poisoned)
    kinds = np.asarray(sel.query_aware)
    assert kinds.any() and not kinds.all(), "both head classes must run"
    masks = flexprefill.mask(sel, np.asarray(lengths), t, block)
    ref = _reference(q, k, v, np.repeat(masks, hq // masks.shape[1], axis=1))
    for b, length in enumerate(np.asarray(lengths).tolist()):
        _check("flexprefill_T%d_H%d_KV%d_D%d_b%d_%s" % shape + f"_row{b}", impl, "bf16", out[b:b + 1], ref[b:b + 1],
               length)


@pytest.mark.parametrize("kind", ["vertical_slash", "flexprefill"])
@pytest.mark.parametrize("impl", IMPLS)
def test_density_guard(impl, kind):
    """The guard at the backend's own threshold: dense float32 attention under ``reference.guarded_mask``
    of the recomputed mask; the short second row keeps every causal block, so heads lie on both sides."""
    from test_density_guard import guarded_run

    t, lengths, hq, hkv, d = 3000, (3000, 100), 8, 2, 128
    q, k, v = random_qkv(4, 2, t, hq, hkv, d, jnp.bfloat16)
    out, guarded = guarded_run(kind, (q, k, v), (q, k), lengths, impl)
    ref = _reference(q, k, v, np.repeat(guarded, hq // guarded.shape[1], axis=1))
    for b, length in enumerate(lengths):
        _check(f"guard_{kind}_row{b}", impl, "bf16", out[b:b + 1], ref[b:b + 1], length)


@pytest.mark.parametrize("impl", IMPLS + ["cudnn"])
def test_values_a_row_cannot_see_never_reach_it(impl):
    """NaN in K and V at positions >= length and at one real key (seen by rows 300..811 of the
    triangle and by every later row of causal attention): the rows that cannot see it equal the clean
    run bit for bit, the rows that see it turn non-finite (every GPU path: xla and triton mask per
    step, mosaic_gpu and cuDNN get K and V through ``guards.guard_values``)."""
    from test_attention import assert_only_seeing_rows_change, poison

    t, lengths, key = 1000, (1000, 777), 300
    q, k, v = random_qkv(6, 2, t, 8, 2, 128, jnp.bfloat16)
    at_key = (np.arange(t)[None, :] >= np.asarray(lengths)[:, None]) | (np.arange(t) == key)[None, :]
    bad = [poison(x, at_key, np.nan) for x in (k, v)]
    name = None if impl == "cudnn" else impl
    traced = jnp.asarray(lengths, jnp.int32)
    causal = jax.jit(lambda *a: tmjax.causal_attention(*a[:3], length=a[3], implementation=name))
    sees = np.broadcast_to(np.arange(t) >= key, (2, t))
    assert_only_seeing_rows_change(causal(q, k, v, traced), causal(q, *bad, traced), sees, lengths)
    if impl != "cudnn":
        sees = np.stack([np.pad(reference.triangle_mask(L, **SIZES)[:, key], (0, t - L)) for L in lengths])
        assert_only_seeing_rows_change(_triangle(q, k, v, traced, impl=impl, **SIZES),
                                       _triangle(q, *bad, traced, impl=impl, **SIZES), sees, lengths)
