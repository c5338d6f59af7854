"""Block tables against the element-wise masks of ``tmjax.pallas_kernels.reference``."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tmjax.pallas_kernels import reference
from tmjax.pallas_kernels.block_tables import band_table, block_table, causal_table


def _block_truth(mask: np.ndarray, block_q: int, block_kv: int):
    """(any visible, all visible) per block of an element-wise mask, blocks cut short at the end."""
    t = mask.shape[0]
    nq, nk = -(-t // block_q), -(-t // block_kv)
    visible = np.zeros((nq, nk), bool)
    full = np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in range(nk):
            tile = mask[i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv]
            visible[i, j], full[i, j] = tile.any(), tile.all()
    return visible, full


def _assert_table_matches(table, mask):
    visible, full = _block_truth(mask, table.block_q, table.block_kv)
    np.testing.assert_array_equal(table.block_mask(), visible)
    for i in range(table.kv_index.shape[0]):
        n, nf = table.num_steps[i], table.num_full[i]
        listed = table.kv_index[i, :n]
        assert len(set(listed.tolist())) == n, f"row {i} lists a block twice"
        # Full blocks first, then partial ones, each ascending; the flag says which is which.
        assert (np.diff(listed[:nf]) > 0).all() and (np.diff(listed[nf:]) > 0).all()
        np.testing.assert_array_equal(table.partial[i, :n], ~full[i, listed])
        # Padding repeats the last listed block.
        assert (table.kv_index[i, n:] == listed[-1]).all()


# (T, block_q, block_kv, n_init, n_local, n_last): ragged T, unequal blocks, no sinks, sinks longer
# than the sequence, a one-token window, n_last covering everything, window longer than T.
CASES = [
    (100, 16, 16, 3, 20, 10),
    (257, 16, 32, 8, 64, 30),
    (300, 32, 16, 20, 10, 5),
    (50, 8, 16, 0, 7, 0),
    (130, 16, 16, 200, 5, 3),
    (200, 16, 8, 1, 1, 0),
    (40, 16, 16, 8, 512, 128),
    (190, 64, 128, 8, 100, 0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triangle_table_lists_exactly_the_visible_blocks(case):
    t, bq, bkv, n_init, n_local, n_last = case
    table = block_table(t, bq, bkv, n_init=n_init, n_local=n_local, n_last=n_last)
    _assert_table_matches(table, reference.triangle_mask(t, n_init, n_local, n_last))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_band_table_is_the_triangle_without_last_rows(case):
    t, bq, bkv, n_init, n_local, _ = case
    _assert_table_matches(band_table(t, bq, bkv, n_init=n_init, n_local=n_local), reference.triangle_mask(t, n_init, n_local, 0))


@pytest.mark.parametrize("t, bq, bkv", [(100, 16, 16), (77, 8, 32), (64, 64, 16)])
def test_causal_table(t, bq, bkv):
    _assert_table_matches(causal_table(t, bq, bkv), reference.causal_mask(t))


def test_listed_keys_cover_the_listed_blocks():
    table = band_table(200, 16, 16, n_init=3, n_local=40)
    keys = table.listed_keys(8)  # rows 128..143 see keys 0..2 and 89..143
    expected = np.zeros(200, bool)
    expected[:16] = True
    expected[80:144] = True
    np.testing.assert_array_equal(keys, expected)


def test_million_token_band_table_is_fast_and_narrow():
    t0 = time.perf_counter()
    table = band_table(1 << 20, 64, 64, n_init=8, n_local=512)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{elapsed:.2f} s for 1M tokens"
    # Rows r0..r0+63 (r0 a multiple of 64) see keys r0-511..r0+63: 9 window blocks, plus block 0.
    assert table.kv_index.shape == (1 << 14, 10)
    # A far row, rows 524288..524351: sink block 0, then keys 523777.. in blocks 8184..8192.
    row = 8192
    listed = table.kv_index[row, : table.num_steps[row]]
    np.testing.assert_array_equal(np.sort(listed), [0] + list(range(8184, 8193)))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(seq_len=0, block_q=16, block_kv=16), "seq_len"),
        (dict(seq_len=10, block_q=0, block_kv=16), "block_q"),
        (dict(seq_len=10, block_q=16, block_kv=16.0), "block_kv"),
        (dict(seq_len=10, block_q=16, block_kv=16, n_init=-1), "n_init"),
        (dict(seq_len=10, block_q=16, block_kv=16, n_local=0), "n_local"),
        (dict(seq_len=10, block_q=16, block_kv=16, n_last=True), "n_last"),
    ],
)
def test_bad_arguments_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        block_table(**kwargs)
