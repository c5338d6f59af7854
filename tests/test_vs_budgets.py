"""Vertical-slash budgets: the mass rule (``mass=gamma``) against a numpy reading of docs/CONTRACTS.md,
and budgets at, just below and far beyond the sequence length against the numpy estimator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax.pallas_kernels import reference, vs_estimate
from attention_fixtures import assert_matches, random_qkv
from test_vertical_slash import assert_valid_selection, numpy_scores


def numpy_keep(score: np.ndarray, forced: np.ndarray, budget: int, mass: float | None) -> list[int]:
    """One row of the contract's rule, written as a loop: rank forced entries first (by index), then
    the others by descending score, ties to the lower index; take the first ``min(budget, n)``; with
    ``mass`` keep a forced one always and another while its score is positive and the mass ranked
    before it is below ``float32(mass) * total``. Ascending, padded with ``n``."""
    n = len(score)
    exists = [i for i in range(n) if score[i] != -np.inf]
    ranking = [i for i in exists if forced[i]] + sorted((i for i in exists if not forced[i]), key=lambda i: (-score[i], i))
    width = min(budget, n)
    if mass is None:
        kept = ranking[:width]
    else:
        threshold = np.float32(mass) * np.float32(sum(score[i] for i in exists))
        kept, before = [], 0.0
        for i in ranking[:width]:
            if forced[i] or (score[i] > 0 and before < threshold):
                kept.append(i)
            before += score[i]
    return sorted(kept) + [n] * (width - len(kept))


def test_numpy_rule_on_a_hand_example():
    """The reference itself, checked by hand: total 1, forced entry 0 (mass 0.5)."""
    score = np.array([0.5, 0.125, 0.25, 0.125, 0.0, -np.inf])
    forced = np.array([True, False, False, False, False, False])
    assert numpy_keep(score, forced, 6, 0.75) == [0, 2, 6, 6, 6, 6]  # 0.5 + 0.25 reaches 0.75: stop
    assert numpy_keep(score, forced, 6, 0.76) == [0, 1, 2, 6, 6, 6]  # tie 0.125: index 1 before 3
    assert numpy_keep(score, forced, 6, 1.0) == [0, 1, 2, 3, 6, 6]  # the zero is never needed
    assert numpy_keep(score, forced, 6, 1e-9) == [0, 6, 6, 6, 6, 6]  # forced mass already covers it
    assert numpy_keep(score, forced, 2, 1.0) == [0, 2]  # the cap
    assert numpy_keep(score, forced, 6, None) == [0, 1, 2, 3, 4, 6]  # fixed budget: every existing entry


def dyadic_scores(seed: int, shape: tuple[int, ...], lengths) -> np.ndarray:
    """Scores in sixteenths (0 to 6/16: many ties and zeros), ``-inf`` past each row's length; every
    sum is exact in float32, so the device's rule can be compared exactly."""
    score = np.random.default_rng(seed).integers(0, 7, size=shape).astype(np.float32) / 16
    past = np.arange(shape[-1])[None, None, :] >= np.asarray(lengths)[:, None, None]
    return np.where(past, -np.inf, score).astype(np.float32)


@pytest.mark.parametrize("mass", [None, 1e-9, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("budget", [1, 7, 49, 50, 64])
@pytest.mark.parametrize("forced_kind", ["prefix", "scattered"])
def test_keep_matches_numpy_rule_exactly(mass, budget, forced_kind):
    """Ties, zeros, gamma near 0 and 1, caps reached and not, budgets at and beyond n, per-row lengths,
    forced prefixes (vertical-slash) and scattered forced entries (FlexPrefill's blocks 0 and qb)."""
    lengths = (50, 23)
    score = dyadic_scores(budget, (2, 3, 50), lengths)
    if forced_kind == "prefix":
        forced = np.asarray(vs_estimate.forced_prefix(min(3, budget), jnp.asarray(lengths), 50))
        forced = np.broadcast_to(forced, score.shape)
    else:
        forced = np.zeros(score.shape, bool)
        forced[..., [0, 17]] = budget >= 2
        forced &= score != -np.inf
    kept = jax.jit(vs_estimate.keep, static_argnums=(2, 3))(jnp.asarray(score), jnp.asarray(forced), budget, mass)
    assert kept.shape == (2, 3, min(budget, 50)) and kept.dtype == jnp.int32
    for b in range(2):
        for h in range(3):
            assert np.asarray(kept[b, h]).tolist() == numpy_keep(score[b, h], forced[b, h], budget, mass), (b, h)


def test_mass_exactly_reached_stops_and_ties_go_to_the_lower_index():
    score = jnp.asarray([[[0.25, 0.25, 0.25, 0.25, 0.0]]])
    none = jnp.zeros(score.shape, bool)
    np.testing.assert_array_equal(vs_estimate.keep(score, none, 5, 0.5), [[[0, 1, 5, 5, 5]]])
    np.testing.assert_array_equal(vs_estimate.keep(score, none, 5, 0.51), [[[0, 1, 2, 5, 5]]])
    np.testing.assert_array_equal(vs_estimate.keep(score, none, 5, 1.0), [[[0, 1, 2, 3, 5]]])


def assert_mass_rule(picked: np.ndarray, score: np.ndarray, width: int, forced: set[int], gamma: float,
                     fill: int) -> None:
    """One selection ``picked`` against float64 ``score`` (of the entries that exist, ``0..len-1``):
    ``width`` slots ascending, unused ones ``fill``; the ``forced`` entries, then a best-scoring set
    that reaches ``gamma`` of the mass with its last entry needed, or the ``width`` cap; float32
    rounding allowed at ties and at the threshold."""
    assert picked.shape == (width,)
    assert (np.diff(picked) >= 0).all(), "not ascending"
    real = picked[picked < fill].tolist()
    assert len(set(real)) == len(real) and (picked[len(real):] == fill).all()
    assert all(j < len(score) for j in real), "kept an entry that does not exist"
    assert forced <= set(real), "a forced entry is missing"
    chosen = [j for j in real if j not in forced]
    rest = sorted(set(range(len(score))) - set(real))
    total, kept_mass = score.sum(), score[real].sum()
    eps = 1e-5 * total
    if chosen and rest:
        assert score[chosen].min() >= score[rest].max() - eps, "a better entry was left out"
    if chosen:
        assert kept_mass - score[chosen].min() < gamma * total + eps, "kept more than the mass needs"
    assert kept_mass >= gamma * total - eps or len(real) == width or not (score[rest] > 0).any(), "mass not reached"


def assert_mass_selection(picked: np.ndarray, score: np.ndarray, cap: int, forced: int, gamma: float,
                          seq_len: int) -> None:
    """``assert_mass_rule`` for vertical-slash columns or diagonals: forced prefix, ``T`` as filler."""
    assert_mass_rule(picked, score, min(cap, seq_len), set(range(min(forced, len(score)))), gamma, seq_len)


ESTIMATOR_CASES = [(333, (333, 150), 4, 1, 64), (200, (200, 40), 6, 2, 64), (150, (150,), 7, 1, 16)]


@pytest.mark.parametrize("gamma", [0.05, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=lambda c: f"T{c[0]}_H{c[2]}_KV{c[3]}")
def test_mass_budgets_match_numpy_estimator(case, selection, gamma):
    t, lengths, hq, hkv, last_q = case
    q, k, _ = random_qkv(17, len(lengths), t, hq, hkv, 64, jnp.float32)
    budgets = dict(vertical=60, slash=90, force_vertical=4, force_slash=3)
    cols, diags = tmjax.vertical_slash_indices(q, k, **budgets, last_q=last_q, length=jnp.asarray(lengths),
                                               selection=selection, mass=gamma)
    heads = hkv if selection == "group" else hq
    for b, length in enumerate(lengths):
        vertical, slash = numpy_scores(np.asarray(q[b]), np.asarray(k[b]), length, last_q, selection)
        for h in range(heads):
            assert_mass_selection(np.asarray(cols[b, h]), vertical[h], 60, 4, gamma, t)
            assert_mass_selection(np.asarray(diags[b, h]), slash[h], 90, 3, gamma, t)


def test_growing_mass_keeps_supersets_and_reaches_the_fixed_budget():
    """A ladder of masses keeps nested sets (what calibration's search relies on); mass 1 with caps
    below the sequence keeps what the fixed budgets keep."""
    q, k, _ = random_qkv(5, 2, 300, 4, 2, 64, jnp.float32)
    lengths = jnp.asarray([300, 170])
    args = dict(vertical=40, slash=50, force_vertical=2, force_slash=2, length=lengths)
    previous = None
    for gamma in (0.1, 0.3, 0.6, 0.9):
        picks = tmjax.vertical_slash_indices(q, k, **args, mass=gamma)
        sets = [[set(np.asarray(x[b, h]).tolist()) - {300} for b in range(2) for h in range(2)] for x in picks]
        if previous is not None:
            assert all(old <= new for kind in range(2) for old, new in zip(previous[kind], sets[kind]))
        previous = sets
    full = tmjax.vertical_slash_indices(q, k, **args, mass=1.0)
    fixed = tmjax.vertical_slash_indices(q, k, **args)
    for x, y in zip(full, fixed):  # random q/k: every score is positive, so mass 1 fills the caps
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("offset", [0, 1], ids=["T", "T-1"])
@pytest.mark.parametrize("selection", ["group", "head"])
def test_budgets_at_the_sequence_length_match_numpy(offset, selection):
    """Budgets of exactly T and T - 1 (one column and one diagonal short of everything), with a full
    row and a shorter one, against the numpy estimator, output shape included."""
    t, lengths = 130, (130, 61)
    q, k, _ = random_qkv(9, 2, t, 4, 2, 64, jnp.float32)
    budget = t - offset
    cols, diags = tmjax.vertical_slash_indices(q, k, vertical=budget, slash=budget, force_vertical=3, force_slash=2,
                                               last_q=64, length=jnp.asarray(lengths), selection=selection)
    heads = 2 if selection == "group" else 4
    assert cols.shape == diags.shape == (2, heads, budget)
    for b, length in enumerate(lengths):
        vertical, slash = numpy_scores(np.asarray(q[b]), np.asarray(k[b]), length, 64, selection)
        for h in range(heads):
            assert_valid_selection(np.asarray(cols[b, h]), vertical[h], budget, 3, t)
            assert_valid_selection(np.asarray(diags[b, h]), slash[h], budget, 2, t)


def test_budgets_beyond_the_sequence_are_clipped_to_it():
    """``VerticalSlash(vertical=10**12, slash=10**12)`` on a 100-token prompt: T-wide outputs (shapes
    checked abstractly first, so a regression cannot try to allocate terabytes), every column and
    diagonal of each row kept, and dense causal attention."""
    t, lengths = 100, (100, 37)
    q, k, v = random_qkv(3, 2, t, 4, 2, 64, jnp.float32)
    huge = dict(vertical=10**12, slash=10**12, length=jnp.asarray(lengths))
    shapes = jax.eval_shape(lambda q, k: tmjax.vertical_slash_indices(q, k, **huge), q, k)
    assert [s.shape for s in shapes] == [(2, 2, t), (2, 2, t)]
    jax.eval_shape(lambda q, k, v: tmjax.vertical_slash_attention(q, k, v, **huge, implementation="xla"), q, k, v)
    cols, diags = tmjax.vertical_slash_indices(q, k, **huge)
    for b, length in enumerate(lengths):
        expected = np.where(np.arange(t) < length, np.arange(t), t)
        np.testing.assert_array_equal(cols[b], np.broadcast_to(expected, (2, t)))
        np.testing.assert_array_equal(diags[b], np.broadcast_to(expected, (2, t)))
    out = jax.jit(lambda q, k, v: tmjax.vertical_slash_attention(q, k, v, **huge, implementation="xla"))(q, k, v)
    ref = reference.masked_attention(q, k, v, reference.causal_mask(t))
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], jnp.float32, f"row {b}")


def test_attention_with_mass_follows_its_selection():
    """``vertical_slash_attention(mass=...)`` attends under the contract mask of what
    ``vertical_slash_indices(mass=...)`` returns (the kernels themselves are tested elsewhere)."""
    from test_vertical_slash import _reference

    t, lengths = 260, (260, 90)
    q, k, v = random_qkv(6, 2, t, 4, 1, 64, jnp.float32)
    args = dict(vertical=40, slash=60, force_vertical=3, force_slash=2, length=jnp.asarray(lengths), mass=0.6)
    cols, diags = tmjax.vertical_slash_indices(q, k, **args)
    assert (np.asarray(cols) == t).any() and (np.asarray(diags) == t).any(), "the mass left no slot unused"
    out = jax.jit(lambda q, k, v: tmjax.vertical_slash_attention(q, k, v, **args, guard=False, implementation="xla"))(q, k, v)
    ref = _reference(q, k, v, np.asarray(cols), np.asarray(diags), lengths)
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], jnp.float32, f"row {b}")


@pytest.mark.parametrize("mass, needle", [(0, r"mass must be in \(0, 1\]"), (1.5, "mass must be in"),
                                          (float("nan"), "mass must be a finite number"), (True, "mass must be a finite"),
                                          ("0.5", "mass must be a finite")])
def test_bad_mass_is_refused(mass, needle):
    q, k, v = random_qkv(0, 1, 16, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match=needle):
        tmjax.VerticalSlash(mass=mass)
    with pytest.raises(ValueError, match=needle):
        tmjax.vertical_slash_indices(q, k, vertical=4, slash=4, force_vertical=1, force_slash=1, mass=mass)
