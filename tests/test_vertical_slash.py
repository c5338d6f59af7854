"""Vertical-slash: the estimator against a float64 numpy reading of the contract, the dynamic tables
against the contract's element mask, and every backend against dense float32 attention under that mask.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax.pallas_kernels import dynamic_tables, reference
from attention_fixtures import BACKENDS, assert_matches, backend_dtype_params, injected_hook, random_qkv, table_mask


def numpy_scores(q: np.ndarray, k: np.ndarray, length: int, last_q: int, selection: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertical and slash scores of one sequence ``[H, length]`` in float64, straight from the
    contract: softmax of the last rows over keys ``j <= row``, column sums and diagonal sums."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    rows = np.arange(max(length - last_q, 0), length)
    vertical = np.zeros((hq, length))
    slash = np.zeros((hq, length))
    for h in range(hq):
        logits = q[rows, h].astype(np.float64) @ k[:length, h // (hq // hkv)].astype(np.float64).T / np.sqrt(d)
        logits[np.arange(length)[None, :] > rows[:, None]] = -np.inf
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        vertical[h] = probs.sum(axis=0)
        for r, row in enumerate(rows):
            slash[h, : row + 1] += probs[r, row - np.arange(row + 1)]
    if selection == "group":
        g = hq // hkv
        return vertical.reshape(hkv, g, length).sum(1), slash.reshape(hkv, g, length).sum(1)
    return vertical, slash


def assert_valid_selection(picked: np.ndarray, score: np.ndarray, budget: int, forced: int, seq_len: int) -> None:
    """``picked`` (one head) keeps the forced entries, then a top-``budget`` set of ``score`` (up to
    float32 rounding at ties), ascending, with ``seq_len`` in unused slots."""
    length = score.shape[0]
    assert picked.shape == (budget,)
    assert (np.diff(picked) >= 0).all(), "not ascending"
    real = picked[picked < seq_len]
    assert len(real) == min(budget, length) and len(set(real.tolist())) == len(real)
    assert (picked[len(real):] == seq_len).all()
    forced_set = set(range(min(forced, length)))
    assert forced_set <= set(real.tolist()), "a forced entry is missing"
    chosen = [j for j in real.tolist() if j not in forced_set]
    rest = sorted(set(range(length)) - set(real.tolist()))
    if chosen and rest:
        worst_chosen, best_rest = score[chosen].min(), score[rest].max()
        assert worst_chosen >= best_rest - 1e-5 * max(1.0, abs(best_rest)), (worst_chosen, best_rest)


# (T, lengths, Hq, Hkv, last_q): ragged T; last_q > L for a short row; GQA 7 per-head.
ESTIMATOR_CASES = [(333, (333, 150), 4, 1, 64), (200, (200, 40), 6, 2, 64), (150, (150,), 7, 1, 16)]


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=lambda c: f"T{c[0]}_H{c[2]}_KV{c[3]}")
def test_estimator_matches_numpy(case, selection):
    t, lengths, hq, hkv, last_q = case
    q, k, _ = random_qkv(7, len(lengths), t, hq, hkv, 64, jnp.float32)
    budgets = dict(vertical=40, slash=30, force_vertical=5, force_slash=4)
    cols, diags = tmjax.vertical_slash_indices(q, k, **budgets, last_q=last_q, length=jnp.asarray(lengths),
                                               selection=selection)
    heads = hkv if selection == "group" else hq
    chex.assert_shape((cols, diags), [(len(lengths), heads, 40), (len(lengths), heads, 30)])
    for b, length in enumerate(lengths):
        vertical, slash = numpy_scores(np.asarray(q[b]), np.asarray(k[b]), length, last_q, selection)
        for h in range(heads):
            assert_valid_selection(np.asarray(cols[b, h]), vertical[h], 40, 5, t)
            assert_valid_selection(np.asarray(diags[b, h]), slash[h], 30, 4, t)


def test_estimator_scores_match_numpy():
    """The float32 scores themselves, not just the picks (the slash skew is easy to get off by one)."""
    from tmjax.pallas_kernels import vs_estimate

    t, lengths = 190, (190, 71)
    q, k, _ = random_qkv(8, 2, t, 4, 2, 64, jnp.float32)
    vertical, slash = vs_estimate.scores(q, k, last_q=64, length=jnp.asarray(lengths), selection="group")
    for b, length in enumerate(lengths):
        ref_v, ref_s = numpy_scores(np.asarray(q[b]), np.asarray(k[b]), length, 64, "group")
        np.testing.assert_allclose(np.asarray(vertical[b, :, :length]), ref_v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(slash[b, :, :length]), ref_s, rtol=1e-5, atol=1e-6)
        assert np.isneginf(np.asarray(vertical[b, :, length:])).all() and np.isneginf(np.asarray(slash[b, :, length:])).all()


def sparse_indices(seed: int, heads: int, seq_len: int, lengths, n_cols: int, n_diags: int):
    """Hand-built kept columns and diagonals ``[B, H, n]`` (ascending, ``seq_len`` in unused slots)
    with structure: a few sinks, scattered columns, the nearest diagonals and a few far ones."""
    rng = np.random.default_rng(seed)
    cols = np.full((len(lengths), heads, n_cols), seq_len, np.int32)
    diags = np.full((len(lengths), heads, n_diags), seq_len, np.int32)
    for b, length in enumerate(lengths):
        for h in range(heads):
            c = np.unique(np.concatenate([np.arange(min(3, length)), rng.integers(0, length, n_cols)]))[:n_cols]
            d = np.unique(np.concatenate([np.arange(min(2, length)), rng.integers(0, length, n_diags)]))[:n_diags]
            cols[b, h, : len(c)], diags[b, h, : len(d)] = c, d
    return jnp.asarray(cols), jnp.asarray(diags)


@pytest.mark.parametrize("t, lengths, n_cols, n_diags", [(700, (700, 380), 12, 6), (333, (200, 64), 9, 5), (130, (130,), 200, 300)])
def test_tables_give_the_contract_mask(t, lengths, n_cols, n_diags):
    cols, diags = sparse_indices(0, 3, t, lengths, n_cols, n_diags)
    padded = -(-t // 64) * 64
    table = jax.jit(dynamic_tables.vertical_slash, static_argnums=3)(cols, diags, jnp.asarray(lengths), padded)
    for b, length in enumerate(lengths):
        for h in range(3):
            expected = reference.vertical_slash_mask(t, length, cols[b, h], diags[b, h])
            np.testing.assert_array_equal(table_mask(table, b, h, length)[:t, :t], expected)


@pytest.mark.parametrize("length", [200, 199, 193])
def test_last_partial_query_block_keeps_only_blocks_its_real_rows_reach(length):
    """Diagonal 64 + c reaches key block ``qb - 1`` from the last query block only if that block has
    more than ``c`` real rows: with ``length = 200`` (8 real rows) diagonal 72 does not, 71 does."""
    t = 256
    diags = jnp.asarray([[[0, 71, 72, 135, 136, t]]], jnp.int32)
    cols = jnp.asarray([[[0, 5, t, t]]], jnp.int32)
    table = dynamic_tables.vertical_slash(cols, diags, jnp.asarray([length]), t)
    expected = reference.vertical_slash_mask(t, length, cols[0, 0], diags[0, 0])
    np.testing.assert_array_equal(table_mask(table, 0, 0, length), expected)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _attend(q, k, v, cols, diags, length, *, implementation):
    """The backend following the table of hand-built picks (the dispatch's table stage, given picks)."""
    from tmjax import attention

    table = dynamic_tables.vertical_slash(cols, diags, length, -(-q.shape[1] // dynamic_tables.BLOCK) * dynamic_tables.BLOCK)
    return attention.attend_table(q, k, v, table, length=length, implementation=implementation)


def _reference(q, k, v, cols, diags, lengths):
    """Dense float32 attention under the contract's mask, per sequence and query head."""
    b, t, hq, _ = q.shape
    heads = cols.shape[1]
    masks = np.zeros((b, hq, t, t), bool)
    for i, length in enumerate(lengths):
        for h in range(heads):
            masks[i, h * hq // heads : (h + 1) * hq // heads] = reference.vertical_slash_mask(t, length, cols[i, h], diags[i, h])
    return jax.jit(reference.masked_attention)(*(x.astype(jnp.float32) for x in (q, k, v)), masks)


# (T, lengths, Hq, Hkv, D, selection): T a multiple of no block size, GQA ratios 1, 4 and 7,
# head_dim 64 and 128, B = 2 right-padded; per-group and per-head selection.
KERNEL_CASES = {
    "mha_d128": (333, (333, 180), 2, 2, 128, "group"),
    "gqa4_group": (700, (700, 450), 8, 2, 64, "group"),
    "gqa4_head": (400, (400, 77), 4, 1, 64, "head"),
    "gqa7_d128": (300, (300, 129), 7, 1, 128, "group"),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES.values()), ids=list(KERNEL_CASES))
@pytest.mark.parametrize("backend, dtype", backend_dtype_params())
def test_kernel_matches_dense_reference(backend, dtype, case):
    t, lengths, hq, hkv, d, selection = case
    backend.require(t, d)
    q, k, v = random_qkv(3, len(lengths), t, hq, hkv, d, dtype)
    heads = hkv if selection == "group" else hq
    cols, diags = sparse_indices(1, heads, t, lengths, 10, 5)
    pad = (np.arange(t)[None, :] >= np.asarray(lengths)[:, None])[:, :, None, None]
    garbage = [jnp.where(pad, 30 * x, x) for x in (q, k, v)]  # padding must change nothing
    out = _attend(*garbage, cols, diags, jnp.asarray(lengths), implementation=backend.name)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, dtype)
    ref = _reference(q, k, v, np.asarray(cols), np.asarray(diags), lengths)
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], dtype, f"{backend.name} row {b}")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_budgets_covering_everything_give_dense_causal_attention(backend):
    t, lengths = 200, (200, 90)
    backend.require(t, 64)
    q, k, v = random_qkv(4, 2, t, 4, 2, 64, backend.dtype)
    out = tmjax.vertical_slash_attention(q, k, v, vertical=t + 5, slash=t + 5, length=jnp.asarray(lengths),
                                         implementation=backend.name)
    ref = reference.masked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), reference.causal_mask(t))
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], backend.dtype, f"row {b}")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_public_entry_estimates_then_attends(backend):
    """``vertical_slash_attention`` = ``vertical_slash_indices`` + the kernel, with last_q > L for
    the shorter row and the estimate's filler slots."""
    t, lengths = 260, (260, 50)
    backend.require(t, 64)
    q, k, v = random_qkv(6, 2, t, 4, 1, 64, backend.dtype)
    budgets = dict(vertical=12, slash=6, force_vertical=3, force_slash=2, last_q=80, length=jnp.asarray(lengths))
    cols, diags = tmjax.vertical_slash_indices(q, k, **budgets)
    out = tmjax.vertical_slash_attention(q, k, v, **budgets, guard=False, implementation=backend.name)
    ref = _reference(q, k, v, np.asarray(cols), np.asarray(diags), lengths)
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], backend.dtype, f"row {b}")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_no_columns_at_all(backend):
    """``vertical=0`` (diagonals only) runs on every backend: the table then has one column chunk
    that never counts (it used to be empty, and slicing it failed)."""
    t, lengths = 130, (130, 95)
    backend.require(t, 64)
    q, k, v = random_qkv(8, 2, t, 2, 1, 64, backend.dtype)
    budgets = dict(vertical=0, slash=3, force_vertical=0, force_slash=2, length=jnp.asarray(lengths))
    cols, diags = tmjax.vertical_slash_indices(q, k, **budgets)
    chex.assert_shape(cols, (2, 1, 0))
    out = tmjax.vertical_slash_attention(q, k, v, **budgets, guard=False, implementation=backend.name)
    ref = _reference(q, k, v, np.asarray(cols), np.asarray(diags), lengths)
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], backend.dtype, f"row {b}")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(vertical=10, slash=8, force_vertical=11), "force_vertical"),
        (dict(vertical=10, slash=0, force_slash=0), "slash"),
        (dict(vertical=10.0, slash=8, force_vertical=2, force_slash=2), "vertical"),
        (dict(vertical=10, slash=8, force_vertical=2, force_slash=2, last_q=0), "last_q"),
        (dict(vertical=10, slash=8, force_vertical=2, force_slash=2, selection="token"), "selection"),
        (dict(vertical=10, slash=8, force_vertical=2, force_slash=2, length=0), "got 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, needle):
    q, k, v = random_qkv(0, 1, 16, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match=needle):
        tmjax.vertical_slash_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match=needle):
        tmjax.vertical_slash_indices(q, k, **kwargs)


def _contract_masks(columns: np.ndarray, diagonals: np.ndarray, length: np.ndarray, seq_len: int, q_heads: int) -> np.ndarray:
    """Bool ``[B, Hq, T, T]`` contract masks (host side, for ``jax.pure_callback``)."""
    b, heads = columns.shape[:2]
    masks = np.zeros((b, q_heads, seq_len, seq_len), bool)
    for i in range(b):
        for h in range(heads):
            masks[i, h * q_heads // heads : (h + 1) * q_heads // heads] = reference.vertical_slash_mask(
                seq_len, int(length[i]), columns[i, h], diagonals[i, h])
    return masks


def test_model_with_shallow_vertical_slash_equals_injected_masks(tmp_path):
    """TriangleMix(2, shallow=VerticalSlash) in a 4-layer model = dense float32 attention with the
    contract's mask (from the estimator's picks, rebuilt on the host) below layer 2 and the triangle
    mask from layer 2 on, injected through the decoder's attention hook."""
    import hf_fixtures
    from tmjax import api
    from tmjax import plan

    params = hf_fixtures.load_tmjax(hf_fixtures.save_tiny_model(tmp_path, "llama", num_hidden_layers=4))
    c = params.config
    t = 300
    pattern = tmjax.VerticalSlash(vertical=16, slash=8, last_q=64, force_vertical=4, force_slash=2, guard=False)
    layout = tmjax.TriangleMix(2, n_init=4, n_local=64, n_last=32, shallow=pattern)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, size=(2, t), dtype=np.int32)
    tri = reference.triangle_mask(t, layout.n_init, layout.n_local, layout.n_last)

    def picks(q, k, length):
        return tmjax.vertical_slash_indices(q, k, vertical=16, slash=8, last_q=64, force_vertical=4, force_slash=2,
                                            length=length)

    hook = injected_hook(layout.switch_layer, tri, _contract_masks, picks)

    full = jax.jit(plan.full_logits, static_argnames=("layout", "attention_fn"))
    expected = full(params, tokens, attention_fn=hook)
    ours = full(params, tokens, layout=layout)
    hf_fixtures.assert_close_to_scale(ours, expected, tol=1e-5)
    logits, _ = api.prefill(params, tokens, layout)  # bucketed: padded to 384
    hf_fixtures.assert_close_to_scale(logits, expected[:, -1], tol=1e-5)
    triangle_only = full(params, tokens, layout=tmjax.TriangleMix(2, n_init=4, n_local=64, n_last=32))
    assert np.max(np.abs(np.asarray(triangle_only - ours))) > 1e-2 * np.max(np.abs(np.asarray(ours))), \
        "vertical-slash changed nothing at this length: the test would not see a wrong pattern"
    alone = full(params, tokens, layout=pattern)  # MInference alone: vertical-slash in every layer
    expected = full(params, tokens, attention_fn=injected_hook(c.num_layers, tri, _contract_masks, picks))
    hf_fixtures.assert_close_to_scale(alone, expected, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_values_a_row_cannot_see_never_reach_it(backend):
    """NaN in V at padded positions and at a real key that only some rows see: the others are
    unchanged bit for bit, the rows that see it turn non-finite."""
    from test_attention import assert_only_seeing_rows_change, poison

    t, lengths = 700, (700, 450)
    backend.require(t, 64)
    q, k, v = random_qkv(11, 2, t, 4, 2, 64, backend.dtype)
    cols, diags = sparse_indices(2, 2, t, lengths, 10, 5)
    masks = [[reference.vertical_slash_mask(t, L, cols[b, h], diags[b, h]) for h in range(2)] for b, L in enumerate(lengths)]
    # a key seen by some rows of both heads and both sequences, and missed by others
    key = next(j for j in range(64, 400) if all(0 < m[:, j].sum() < L - j for row, L in zip(masks, lengths) for m in row))
    padding = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]
    bad_v = poison(v, padding | (np.arange(t) == key)[None, :], np.nan)
    out = _attend(q, k, bad_v, cols, diags, jnp.asarray(lengths), implementation=backend.name)
    clean = _attend(q, k, v, cols, diags, jnp.asarray(lengths), implementation=backend.name)
    for h in range(2):  # KV head h serves query heads 2h, 2h+1
        sees = np.stack([masks[b][h][:, key] for b in range(2)])
        heads = slice(2 * h, 2 * h + 2)
        assert_only_seeing_rows_change(clean[:, :, heads], out[:, :, heads], sees, lengths)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_last_partial_query_block_through_every_backend(backend):
    """The last-block rule of ``test_last_partial_query_block_keeps_only_blocks_its_real_rows_reach``
    through each kernel (the xla backend rebuilds the last block's offset list from the table)."""
    t, lengths = 256, (200, 193)
    backend.require(t, 64)
    q, k, v = random_qkv(12, 2, t, 4, 2, 64, backend.dtype)
    diags = jnp.asarray(np.broadcast_to([0, 71, 72, 135, 136, t], (2, 2, 6)), jnp.int32)
    cols = jnp.asarray(np.broadcast_to([0, 5, t, t], (2, 2, 4)), jnp.int32)
    out = _attend(q, k, v, cols, diags, jnp.asarray(lengths), implementation=backend.name)
    ref = _reference(q, k, v, np.asarray(cols), np.asarray(diags), lengths)
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], backend.dtype, f"row {b}")
