"""The kernels' one table format (``tmjax.pallas_kernels.tables``): static tables against the
element masks they describe, explicit key-block lists (FlexPrefill's query-aware heads) against a mask
recomputed from the blocks, and every backend running such lists against dense float32 attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmjax import attention
from tmjax.pallas_kernels import block_tables, dynamic_tables, reference, tables
from attention_fixtures import BACKENDS, assert_matches, random_qkv, table_mask


def _static_mask(table: tables.Table) -> np.ndarray:
    """The element mask a kernel following a static table computes: full steps whole, partial steps
    by the table's rule (causal, plus the band when ``n_local`` is set)."""
    t, bq, bkv = table.seq_len, table.block_q, table.block_kv
    mask = np.zeros((t, t), bool)
    for qb, blocks in enumerate(tables.listed_blocks(table)):
        rows = np.arange(qb * bq, min((qb + 1) * bq, t))
        for s, kb in enumerate(blocks):
            keys = np.arange(kb * bkv, min((kb + 1) * bkv, t))
            seen = np.ones((rows.size, keys.size), bool)
            if s >= table.num_full[qb]:
                seen = table.visible(rows[:, None], keys[None, :])
            mask[rows[:, None], keys[None, :]] |= seen
    return mask


@pytest.mark.parametrize("seq_len, block_q, block_kv, n_init, n_local",
                         [(333, 16, 16, 4, 40), (256, 64, 32, 8, 100), (200, 32, 64, 0, 1), (130, 16, 32, 0, None)])
def test_static_table_runs_the_band_or_causal_mask(seq_len, block_q, block_kv, n_init, n_local):
    """Static tables in the kernels' format: the listed rows of the analytic builder (padding repeats
    the last block), and full-then-masked steps giving exactly the band (or causal) mask."""
    if n_local is None:
        table, source = block_tables.causal(seq_len, block_q, block_kv), block_tables.causal_table(seq_len, block_q, block_kv)
        expected = reference.causal_mask(seq_len)
    else:
        table = block_tables.band(seq_len, block_q, block_kv, n_init=n_init, n_local=n_local)
        source = block_tables.band_table(seq_len, block_q, block_kv, n_init=n_init, n_local=n_local)
        expected = reference.triangle_mask(seq_len, n_init, n_local, 0)
    assert not table.dynamic and table.max_steps == source.max_steps
    for qb, blocks in enumerate(tables.listed_blocks(table)):
        np.testing.assert_array_equal(blocks, source.kv_index[qb, : source.num_steps[qb]])
        row = np.asarray(table.index)[table.first[qb]: table.first[qb] + table.max_steps]
        assert (row[source.num_steps[qb]:] == blocks[-1]).all()
    np.testing.assert_array_equal(_static_mask(table), expected)


def _made_up_blocks(seed: int, batch: int, heads: int, nq: int, width: int) -> np.ndarray:
    """Kept key blocks ``[B, H, nq, K]`` as an estimator might return them, but unsorted, with
    repeats, blocks after the query block and unused slots (``nq``) scattered in: the builder must
    keep each block before or at the query block once, the diagonal last."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, nq + 2, size=(batch, heads, nq, width)).astype(np.int32)
    blocks[..., 0] = np.arange(nq)[None, None, :]  # the diagonal block is always kept
    blocks[..., 1] = 0  # a sink block, sometimes repeating the diagonal
    return rng.permuted(blocks, axis=-1)


def _recomputed_mask(blocks: np.ndarray, length: int, seq_len: int, block: int) -> np.ndarray:
    """Query ``i < length`` sees key ``j <= i`` iff ``j // block`` is among ``blocks[i // block]``."""
    mask = np.zeros((seq_len, seq_len), bool)
    i = np.arange(length)
    for j in range(seq_len):
        kept = (blocks[i // block] == j // block).any(axis=-1)
        mask[i, j] = kept & (j <= i)
    return mask


@pytest.mark.parametrize("block, seq_len, lengths", [(64, 320, (320, 130)), (32, 256, (200, 33)), (128, 384, (384, 129))])
def test_block_lists_give_the_recomputed_mask(block, seq_len, lengths):
    nq, heads = seq_len // block, 3
    blocks = _made_up_blocks(block, len(lengths), heads, nq, 5)
    build = jax.jit(dynamic_tables.block_lists, static_argnums=(2, 3))
    table = build(jnp.asarray(blocks), jnp.asarray(lengths), seq_len, block)
    assert table.dynamic and table.heads == heads and not table.relative
    for b, length in enumerate(lengths):
        for h in range(heads):
            expected = _recomputed_mask(blocks[b, h], length, seq_len, block)
            np.testing.assert_array_equal(table_mask(table, b, h, length), expected)
            live = np.arange(nq) * block < length
            assert (np.asarray(table.num_steps)[b, h][~live] == 0).all(), "a query block past the length has work"


def test_block_lists_refuse_a_shape_that_is_not_whole_blocks():
    blocks = jnp.zeros((1, 1, 4, 2), jnp.int32)
    with pytest.raises(ValueError, match="multiple of block"):
        dynamic_tables.block_lists(blocks, jnp.asarray([100]), 250, 64)
    with pytest.raises(ValueError, match="query blocks"):
        dynamic_tables.block_lists(blocks, jnp.asarray([100]), 320, 64)


@functools.partial(jax.jit, static_argnames=("implementation", "block"))
def _attend_lists(q, k, v, blocks, lengths, *, implementation, block):
    padded = -(-q.shape[1] // block) * block
    table = dynamic_tables.block_lists(blocks, lengths, padded, block)
    return attention.attend_table(q, k, v, table, length=lengths, implementation=implementation)


# (T, lengths, Hq, Hkv, selection heads, D, block): T a multiple of no block, GQA 4 per group and per
# query head, GQA 7; blocks of 64 (every backend) and 128 (not mosaic_gpu, whose dynamic tables are 64).
LIST_CASES = {
    "gqa4_group_b64": (300, (300, 170), 8, 2, 2, 64, 64),
    "gqa4_head_b64": (260, (260, 65), 4, 1, 4, 64, 64),
    "gqa7_d128_b128": (300, (300, 129), 7, 1, 1, 128, 128),
}


@pytest.mark.parametrize("case", list(LIST_CASES.values()), ids=list(LIST_CASES))
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_block_lists_through_every_backend(backend, case):
    """Dense float32 attention under the recomputed mask, per sequence and query head; garbage in
    the padding changes nothing."""
    t, lengths, hq, hkv, heads, d, block = case
    backend.require(t, d)
    if backend.name == "mosaic_gpu" and block != 64:
        pytest.skip("mosaic_gpu runs dynamic tables of 64-token blocks")
    dtype = backend.dtype
    q, k, v = random_qkv(21, len(lengths), t, hq, hkv, d, dtype)
    nq = -(-t // block)
    blocks = _made_up_blocks(7, len(lengths), heads, nq, 3)
    pad = (np.arange(t)[None, :] >= np.asarray(lengths)[:, None])[:, :, None, None]
    garbage = [jnp.where(pad, 30 * x, x) for x in (q, k, v)]
    out = _attend_lists(*garbage, jnp.asarray(blocks), jnp.asarray(lengths), implementation=backend.name, block=block)
    masks = np.zeros((len(lengths), hq, t, t), bool)
    for b, length in enumerate(lengths):
        for h in range(heads):
            padded = _recomputed_mask(blocks[b, h], length, nq * block, block)[:t, :t]
            masks[b, h * hq // heads:(h + 1) * hq // heads] = padded
    ref = reference.masked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), masks)
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], dtype, f"{backend.name} row {b}")
