"""The density guard (``tmjax.pallas_kernels.density``): a head switches to the full causal lists exactly
when its kept fraction, recomputed from the unguarded mask (``reference.block_density``), is above the
threshold; every head dense runs the dense causal kernel; guarded attention follows the guarded mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax.pallas_kernels import density, dynamic_tables, flexprefill, reference, tuning
from attention_fixtures import BACKENDS, assert_matches, random_qkv, table_mask

T, LENGTHS, HQ, HKV, D = 550, (550, 300), 4, 2, 64
PADDED = 576
SHORT = (550, 100)  # the second row keeps every causal block: heads on both sides of any threshold


def _vs_picks(seed: int):
    q, k, _ = random_qkv(seed, len(LENGTHS), T, HQ, HKV, D, jnp.float32)
    return tmjax.vertical_slash_indices(q, k, vertical=2, slash=3, force_vertical=1, force_slash=1,
                                        length=jnp.asarray(LENGTHS))


def _fp_selection(seed: int):
    q, k, _ = random_qkv(seed, len(LENGTHS), T, HQ, HKV, D, jnp.float32)
    d = np.sort(np.asarray(flexprefill.distances(q, k, block=128, length=jnp.asarray(LENGTHS),
                                                 selection="group")).ravel())
    return flexprefill.select(q, k, gamma=0.5, tau=float(d[1] + d[2]) / 2, block=128, max_blocks=2, vertical=6,
                              slash=5, force_vertical=1, force_slash=1, length=jnp.asarray(LENGTHS),
                              selection="group")


def _unguarded_masks(kind: str, picks) -> np.ndarray:
    if kind == "flexprefill":
        return flexprefill.mask(picks, LENGTHS, PADDED, 128)
    cols, diags = (np.asarray(x) for x in picks)
    return np.stack([np.stack([reference.vertical_slash_mask(PADDED, n, cols[b, h], diags[b, h])
                               for h in range(cols.shape[1])]) for b, n in enumerate(LENGTHS)])


def _table(kind: str, picks, dense_above):
    lengths = jnp.asarray(LENGTHS)
    if kind == "flexprefill":
        return dynamic_tables.flexprefill(picks, lengths, PADDED, 128, dense_above)
    return dynamic_tables.vertical_slash(*picks, lengths, PADDED, dense_above)


@pytest.mark.parametrize("kind, picks", [("vertical_slash", _vs_picks), ("flexprefill", _fp_selection)])
def test_guard_switches_exactly_at_the_threshold(kind, picks):
    """For each head's recomputed fraction f: a threshold just below f makes that head (and every head
    above it) the full causal lists, one at or just above f leaves it as selected."""
    picks = picks(3)
    masks = _unguarded_masks(kind, picks)
    fractions = np.asarray([[np.divide(*reference.block_density(masks[b, h], n)) for h in range(masks.shape[1])]
                            for b, n in enumerate(LENGTHS)])
    assert fractions.min() < 1 and len(np.unique(fractions)) > 1, fractions
    for f in np.unique(fractions):
        for dense_above in (f - 1e-4, f + 1e-4):
            table = _table(kind, picks, float(dense_above))
            for b, n in enumerate(LENGTHS):
                for h in range(masks.shape[1]):
                    want = reference.guarded_mask(masks[b, h], n, float(dense_above))
                    np.testing.assert_array_equal(table_mask(table, b, h, n), want,
                                                  err_msg=f"{kind} threshold {dense_above} row {b} head {h}")


def test_every_head_dense_takes_the_causal_kernel():
    """``all_causal`` is true exactly when every real query block lists all its causal blocks."""
    picks = _vs_picks(3)
    lengths = jnp.asarray(LENGTHS)
    assert bool(density.all_causal(dynamic_tables.vertical_slash(*picks, lengths, PADDED, 0.0), lengths))
    assert not bool(density.all_causal(dynamic_tables.vertical_slash(*picks, lengths, PADDED, 0.999), lengths))
    assert not bool(density.all_causal(dynamic_tables.vertical_slash(*picks, lengths, PADDED), lengths))


def guarded_run(kind: str, inputs, clean, lengths: tuple[int, ...], implementation: str):
    """The guard test's pattern (a short row that keeps every causal block beside a sparse long one) on
    ``implementation`` at its own threshold: ``(output, guarded masks [B, H, T, T])``, after checking that
    heads lie on both sides of the threshold where it is below 1 (also used by tests/test_gpu.py)."""
    q, k = clean[:2]
    t, hq, hkv, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    length = jnp.asarray(lengths)
    threshold = tuning.dense_above(implementation, q_heads=hq, kv_heads=hkv, head_dim=d, pattern="vertical_slash")
    if kind == "flexprefill":
        pattern = tmjax.FlexPrefill(gamma=0.5, tau=1.0, block=64, max_blocks=2, vertical=2, slash=3,
                                    force_vertical=1, force_slash=1)
        out, sel = jax.jit(lambda q, k, v: tmjax.flexprefill_attention(
            q, k, v, pattern, length=length, implementation=implementation, return_selection=True))(*inputs)
        masks = flexprefill.mask(sel, lengths, t, 64)
    else:
        budgets = dict(vertical=1, slash=1, force_vertical=1, force_slash=1, length=length)
        out = jax.jit(lambda q, k, v: tmjax.vertical_slash_attention(q, k, v, **budgets,
                                                                      implementation=implementation))(*inputs)
        cols, diags = (np.asarray(x) for x in tmjax.vertical_slash_indices(q, k, **budgets))
        masks = np.stack([np.stack([reference.vertical_slash_mask(t, n, cols[b, h], diags[b, h])
                                    for h in range(cols.shape[1])]) for b, n in enumerate(lengths)])
    kept = np.asarray([[np.divide(*reference.block_density(masks[b, h], n)) for h in range(masks.shape[1])]
                       for b, n in enumerate(lengths)])
    if threshold < 1.0:  # a threshold of 1 (dense never pays on this backend and device) keeps every pick
        assert (kept > threshold).any() and (kept < threshold).any(), f"no heads on both sides of {threshold}: {kept}"
    guarded = np.stack([np.stack([reference.guarded_mask(masks[b, h], n, threshold) for h in range(masks.shape[1])])
                        for b, n in enumerate(lengths)])
    return out, guarded


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("kind", ["vertical_slash", "flexprefill"])
def test_guarded_attention_follows_the_guarded_mask(backend, kind):
    """``guard=True`` at the backend's own threshold (``tuning.dense_above``): dense float32 attention
    under ``reference.guarded_mask`` of the recomputed mask; NaN past each row's length is never seen."""
    backend.require(T, D)
    q, k, v = random_qkv(4, len(SHORT), T, HQ, HKV, D, backend.dtype)
    pad = (np.arange(T)[None, :] >= np.asarray(SHORT)[:, None])[:, :, None, None]
    poisoned = [jnp.where(pad, jnp.nan, x) for x in (q, k, v)]
    out, guarded = guarded_run(kind, poisoned, (q, k), SHORT, backend.name)
    ref = reference.masked_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                                     np.repeat(guarded, HQ // guarded.shape[1], axis=1))
    for b, n in enumerate(SHORT):
        assert_matches(out[b, :n], ref[b, :n], backend.dtype, f"{backend.name} {kind} row {b}")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_all_dense_layer_equals_causal_attention(backend):
    """Budgets covering the sequence: every head is dense, the layer runs ``causal_attention``."""
    backend.require(T, D)
    q, k, v = random_qkv(6, len(LENGTHS), T, HQ, HKV, D, backend.dtype)
    out = tmjax.vertical_slash_attention(q, k, v, vertical=T, slash=T, length=jnp.asarray(LENGTHS),
                                         implementation=backend.name)
    ref = reference.masked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), reference.causal_mask(T))
    for b, n in enumerate(LENGTHS):
        assert_matches(out[b, :n], ref[b, :n], backend.dtype, f"{backend.name} row {b}")
