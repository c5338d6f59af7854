"""FlexPrefill estimation against a float64 numpy reading of docs/CONTRACTS.md: the head classification
(square-root Jensen-Shannon distance), the query-aware block lists, the vertical-slash heads' mass rule,
and the element mask a FlexSelection stands for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax.pallas_kernels import flexprefill, reference
from attention_fixtures import random_qkv
from test_vertical_slash import numpy_scores
from test_vs_budgets import assert_mass_rule, assert_mass_selection


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_flex(q: np.ndarray, k: np.ndarray, length: int, block: int, selection: str) -> tuple[np.ndarray, np.ndarray]:
    """One sequence (q ``[T, Hq, D]``, k ``[T, Hkv, D]``) in float64: the distances ``[H]`` and the
    query-aware block scores ``[H, n, n]`` (``-inf`` where a key block is not visible)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    n, n_real = -(-t // block), -(-length // block)
    q, k = q.astype(np.float64), k.astype(np.float64)

    def means(x: np.ndarray) -> np.ndarray:
        return np.stack([x[i * block : min((i + 1) * block, length)].mean(0) for i in range(n_real)])

    q_bar, k_bar = means(q), means(k)
    rows = np.arange(max(length - block, 0), length)
    truth, estimate = np.zeros((hq, n_real)), np.zeros((hq, n_real))
    blocks = np.full((hq, n, n), -np.inf)
    for h in range(hq):
        kv = h // group
        logits = q[rows, h] @ k[:length, kv].T / np.sqrt(d)
        logits[np.arange(length)[None, :] > rows[:, None]] = -np.inf
        per_key = np.mean([_softmax(row) for row in logits], axis=0)
        truth[h] = [per_key[i * block : (i + 1) * block].sum() for i in range(n_real)]
        estimate[h] = _softmax(q[rows, h].mean(0) @ k_bar[:, kv].T / np.sqrt(d))
        for qb in range(n_real):
            blocks[h, qb, : qb + 1] = _softmax(q_bar[qb, h] @ k_bar[: qb + 1, kv].T / np.sqrt(d))
    if selection == "group":
        truth, estimate = (x.reshape(hkv, group, -1).mean(1) for x in (truth, estimate))
        blocks = blocks.reshape(hkv, group, n, n).mean(1)  # -inf stays -inf
    middle = (truth + estimate) / 2
    js = 0.5 * (truth * np.log(truth / middle)).sum(-1) + 0.5 * (estimate * np.log(estimate / middle)).sum(-1)
    return np.sqrt(js), blocks


# (T, lengths, Hq, Hkv, D, block, selection): T a multiple of no block, B = 2 with per-row lengths
# (a row shorter than one block too), GQA 1/4/7, head_dim 64 and 128, blocks of 64 and 128.
CASES = {
    "mha_d64": (333, (333, 150), 4, 4, 64, 64, "head"),
    "gqa4_d128_group": (300, (300, 77), 8, 2, 128, 64, "group"),
    "gqa7_block128": (400, (400, 100), 7, 1, 64, 128, "group"),
    "gqa4_d128_head": (200, (130, 200), 4, 1, 128, 64, "head"),
}
STATIC = ("block", "max_blocks", "vertical", "slash", "force_vertical", "force_slash", "selection",
          "query_blocks_per_step")
_select = jax.jit(flexprefill.select, static_argnames=STATIC)  # gamma and tau traced: one compile per shape
_distances = jax.jit(flexprefill.distances, static_argnames=("block", "selection"))


def run(case, seed=0, dtype=jnp.float32, **options):
    """Inputs of ``case`` and the estimator's selection with ``options`` over the defaults below."""
    t, lengths, hq, hkv, d, block, selection = case
    q, k, _ = random_qkv(seed, len(lengths), t, hq, hkv, d, dtype)
    args = dict(gamma=0.9, tau=0.1, block=block, max_blocks=100, vertical=40, slash=60, force_vertical=3,
                force_slash=2, selection=selection) | options
    return q, k, _select(q, k, length=jnp.asarray(lengths), **args)


def references(case, q, k):
    t, lengths, _, _, _, block, selection = case
    return [numpy_flex(np.asarray(q[b], np.float32), np.asarray(k[b], np.float32), length, block, selection)
            for b, length in enumerate(lengths)]


def middle_tau(distances: np.ndarray) -> float:
    """A tau between two neighbouring distances, splitting the heads into both classes with a margin."""
    values = np.sort(distances.reshape(-1))
    gaps = np.diff(values)
    i = len(values) // 2 - 1 + int(np.argmax(gaps[len(values) // 2 - 1 : len(values) // 2 + 1]))
    assert gaps[i] > 1e-3, "no margin between the classes"
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_distances_match_numpy(case, dtype):
    t, lengths, _, _, _, block, selection = case
    q, k, _ = random_qkv(1, len(lengths), t, case[2], case[3], case[4], dtype)
    got = _distances(q, k, block=block, length=jnp.asarray(lengths), selection=selection)
    want = np.stack([dist for dist, _ in references(case, q, k)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_classification_follows_tau(case):
    """Heads below tau are query-aware; tau 0 makes none, tau 1 (above the largest distance,
    sqrt(ln 2)) every head."""
    q, k, _ = run(case, seed=2)
    want = np.stack([dist for dist, _ in references(case, q, k)])
    tau = middle_tau(want)
    for tau_, expected in ((tau, want < tau), (0.0, np.zeros_like(want, bool)), (1.0, np.ones_like(want, bool))):
        _, _, sel = run(case, seed=2, tau=tau_)
        np.testing.assert_array_equal(np.asarray(sel.query_aware), expected)
    assert expected.dtype == bool and 0 < (want < tau).sum() < want.size


@pytest.mark.parametrize("gamma, max_blocks", [(0.5, 3), (0.9, 100), (1.0, 100), (1.0, 2), (0.05, 3)])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_query_aware_blocks_match_numpy(case, gamma, max_blocks):
    """tau = 1: every head query-aware. Per real query block: blocks 0 and qb, then the best pooled
    scores to gamma of the row's mass, within max_blocks; padding query blocks keep nothing."""
    t, lengths, _, _, _, block, _ = case
    q, k, sel = run(case, seed=3, tau=1.0, gamma=gamma, max_blocks=max_blocks)
    n = -(-t // block)
    width = min(max_blocks, n)
    assert sel.blocks.shape == (*sel.query_aware.shape, n, width) and sel.blocks.dtype == jnp.int32
    assert (np.asarray(sel.columns) == t).all() and (np.asarray(sel.diagonals) == t).all()
    for b, (length, (_, scores)) in enumerate(zip(lengths, references(case, q, k))):
        for h in range(sel.blocks.shape[1]):
            for qb in range(n):
                picked = np.asarray(sel.blocks[b, h, qb])
                if qb * block >= length:
                    assert (picked == n).all(), f"padding query block {qb} keeps blocks"
                    continue
                assert_mass_rule(picked, scores[h, qb, : qb + 1], width, {0, qb}, gamma, n)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_vertical_slash_heads_follow_the_mass_rule(case):
    """tau = 0: every head vertical-slash, its columns and diagonals by the mass rule on the last
    ``block`` rows' scores (numpy estimator), its block lists empty."""
    t, lengths, hq, hkv, _, block, selection = case
    q, k, sel = run(case, seed=4, tau=0.0, gamma=0.7)
    assert not np.asarray(sel.query_aware).any()
    assert (np.asarray(sel.blocks) == -(-t // block)).all()
    assert sel.columns.shape == (len(lengths), sel.query_aware.shape[1], 40) and sel.diagonals.shape[-1] == 60
    for b, length in enumerate(lengths):
        vertical, slash = numpy_scores(np.asarray(q[b]), np.asarray(k[b]), length, block, selection)
        for h in range(sel.columns.shape[1]):
            assert_mass_selection(np.asarray(sel.columns[b, h]), vertical[h], 40, 3, 0.7, t)
            assert_mass_selection(np.asarray(sel.diagonals[b, h]), slash[h], 60, 2, 0.7, t)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_mixed_heads_and_their_mask(case):
    """With both classes present: each head fills only its own part, and the expanded mask is causal,
    empty past the row's length and holds every real row's diagonal."""
    t, lengths, _, _, _, block, _ = case
    q, k, _ = run(case, seed=5)
    tau = middle_tau(np.stack([dist for dist, _ in references(case, q, k)]))
    _, _, sel = run(case, seed=5, tau=tau, gamma=0.3, max_blocks=2)
    qa = np.asarray(sel.query_aware)
    n = -(-t // block)
    assert qa.any() and not qa.all()
    assert ((np.asarray(sel.blocks) == n).all(axis=(2, 3)) == ~qa).all()
    assert ((np.asarray(sel.columns) == t).all(axis=2) == qa).all()
    assert ((np.asarray(sel.diagonals) == t).all(axis=2) == qa).all()
    masks = flexprefill.mask(sel, lengths, t, block)
    causal = reference.causal_mask(t)
    for b, length in enumerate(lengths):
        assert not (masks[b] & ~causal).any(), "a row sees a later key"
        assert not masks[b, :, length:].any(), "a padding row sees keys"
        assert masks[b][:, np.arange(length), np.arange(length)].all(), "a real row misses its diagonal"


def test_mask_follows_the_contract_on_a_hand_built_selection():
    """One query-aware and one vertical-slash head, T = 150, blocks of 64: the mask against the
    definition written element by element."""
    t, length, block, n = 150, 140, 64, 3
    blocks = np.array([[[0, n], [0, 1], [0, 2]], [[n, n]] * 3])[None].astype(np.int32)
    columns = np.array([[[t, t], [3, 100]]], np.int32)
    diagonals = np.array([[[t, t], [0, 70]]], np.int32)
    sel = flexprefill.FlexSelection(np.array([[True, False]]), blocks, columns, diagonals)
    got = flexprefill.mask(sel, [length], t, block)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    qa = (j <= i) & (i < length) & ((j // block == 0) | (j // block == i // block))
    np.testing.assert_array_equal(got[0, 0], qa)
    np.testing.assert_array_equal(got[0, 1], reference.vertical_slash_mask(t, length, [3, 100], [0, 70]))


@pytest.mark.parametrize("case", [CASES["gqa4_d128_group"], CASES["gqa7_block128"]], ids=["gqa4", "gqa7"])
def test_scheduling_and_padding_change_nothing(case):
    """Query-aware scores built 1 or 2 query blocks per step give the default's selection, and NaN or
    huge values at padded positions of q and k change nothing."""
    t, lengths = case[:2]
    q, k, sel = run(case, seed=6, tau=1.0, max_blocks=3, gamma=0.6)
    for per_step in (1, 2):
        _, _, other = run(case, seed=6, tau=1.0, max_blocks=3, gamma=0.6, query_blocks_per_step=per_step)
        for x, y in zip(sel, other):
            np.testing.assert_array_equal(x, y)
    pad = (np.arange(t)[None, :] >= np.asarray(lengths)[:, None])[:, :, None, None]
    for tau in (1.0, 0.0):
        clean = _select(q, k, length=jnp.asarray(lengths), gamma=0.6, tau=tau, block=case[5], max_blocks=3,
                        vertical=40, slash=60, force_vertical=3, force_slash=2, selection=case[6])
        dirty = _select(jnp.where(pad, jnp.nan, q), jnp.where(pad, 1e4, k), length=jnp.asarray(lengths), gamma=0.6,
                        tau=tau, block=case[5], max_blocks=3, vertical=40, slash=60, force_vertical=3, force_slash=2,
                        selection=case[6])
        for x, y in zip(clean, dirty):
            np.testing.assert_array_equal(x, y)


def test_layout_defaults_and_shallow_use():
    fp = tmjax.FlexPrefill()
    assert (fp.gamma, fp.tau, fp.block) == (0.9, 0.1, 128)
    layout = tmjax.TriangleMix(2, shallow=fp)
    assert [layout.attention_at(i) for i in range(4)] == [fp, fp, layout, layout]
    assert fp.attention_at(5) is fp


def test_every_model_takes_flexprefill_layers():
    for layout in (tmjax.FlexPrefill(), tmjax.TriangleMix(2, shallow=tmjax.FlexPrefill()),
                   tmjax.TriangleMix(2, shallow=tmjax.VerticalSlash())):
        layout.check_layers(4)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(gamma=0), r"gamma must be in \(0, 1\]"),
        (dict(gamma=1.01), "gamma"),
        (dict(gamma="0.9"), "gamma must be a finite number"),
        (dict(tau=-0.1), r"tau must be in \[0, 1\]"),
        (dict(tau=float("inf")), "tau must be a finite"),
        (dict(block=96), "block must be a multiple of 64"),
        (dict(block=32), "block must be >= 64"),
        (dict(max_blocks=1), "max_blocks must be >= 2"),
        (dict(vertical=10, force_vertical=11), r"force_vertical \(11\) must be <= vertical \(10\)"),
        (dict(force_slash=0), "force_slash must be >= 1"),
        (dict(selection="block"), "selection"),
    ],
)
def test_bad_values_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tmjax.FlexPrefill(**kwargs)
    with pytest.raises(ValueError, match="shallow must be None, a VerticalSlash or a FlexPrefill"):
        tmjax.TriangleMix(2, shallow="flexprefill")


def test_growing_gamma_keeps_supersets():
    """What calibration's gamma ladder relies on: the head classes do not move, and every block list,
    column list and diagonal list of a larger gamma contains the smaller one's."""
    case = CASES["gqa4_d128_group"]
    q, k, _ = run(case, seed=7)
    tau = middle_tau(np.stack([dist for dist, _ in references(case, q, k)]))
    previous = None
    for gamma in (0.2, 0.5, 0.8, 0.95, 1.0):
        _, _, sel = run(case, seed=7, tau=tau, gamma=gamma, max_blocks=4)
        if previous is not None:
            np.testing.assert_array_equal(sel.query_aware, previous.query_aware)
            for old, new, fill in zip(previous[1:], sel[1:], (-(-case[0] // case[5]), case[0], case[0])):
                old, new = np.asarray(old), np.asarray(new)
                for row_old, row_new in zip(old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1])):
                    assert set(row_old[row_old < fill].tolist()) <= set(row_new[row_new < fill].tolist())
        previous = sel
