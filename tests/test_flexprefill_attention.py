"""FlexPrefill attention (``tmjax.flexprefill_attention``): every backend against dense float32 attention
under ``flexprefill.mask`` recomputed from the selection the call returns, the table against that mask,
and a model with ``TriangleMix(s, shallow=FlexPrefill)`` / ``FlexPrefill`` against injected masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax.pallas_kernels import dynamic_tables, flexprefill, reference
from attention_fixtures import BACKENDS, assert_matches, injected_hook, random_qkv, table_mask

# (T, lengths, Hq, Hkv, D, block, selection): T a multiple of no block; GQA 4, 1 (per head), 7.
CASES = {
    "gqa4_group_d64_b128": (300, (300, 170), 8, 2, 64, 128, "group"),
    "gqa1_head_d128_b64": (200, (200, 77), 2, 2, 128, 64, "head"),
    "gqa7_group_d64_b128": (260, (260, 131), 7, 1, 64, 128, "group"),
}
OPTIONS = dict(gamma=0.6, max_blocks=3, vertical=20, slash=30, force_vertical=2, force_slash=3, guard=False)


def _mixed_tau(q, k, lengths, block: int, selection: str) -> float:
    """A ``tau`` between the heads' distances, so that the case has heads of both classes."""
    d = np.sort(np.asarray(flexprefill.distances(q, k, block=block, length=jnp.asarray(lengths),
                                                 selection=selection)).ravel())
    i = len(d) // 2
    return float((d[i - 1] + d[i]) / 2)


@functools.partial(jax.jit, static_argnames=("pattern", "implementation"))
def _attend(q, k, v, lengths, *, pattern, implementation):
    return tmjax.flexprefill_attention(q, k, v, pattern, length=lengths, implementation=implementation,
                                       return_selection=True)


def _masks(selection, lengths, t: int, block: int, q_heads: int) -> np.ndarray:
    masks = flexprefill.mask(selection, lengths, t, block)
    return np.repeat(masks, q_heads // masks.shape[1], axis=1)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_every_backend_follows_the_recomputed_mask(backend, case):
    """Heads of both classes; NaN / Inf past each row's length change no real row."""
    t, lengths, hq, hkv, d, block, selection = case
    backend.require(t, d)
    q, k, v = random_qkv(5, len(lengths), t, hq, hkv, d, backend.dtype)
    pattern = tmjax.FlexPrefill(tau=_mixed_tau(q, k, lengths, block, selection), block=block, selection=selection,
                                **OPTIONS)
    pad = (np.arange(t)[None, :] >= np.asarray(lengths)[:, None])[:, :, None, None]
    poisoned = [jnp.where(pad, bad, x) for x, bad in zip((q, k, v), (jnp.nan, jnp.inf, -jnp.inf))]
    out, sel = _attend(*poisoned, jnp.asarray(lengths), pattern=pattern, implementation=backend.name)
    kinds = np.asarray(sel.query_aware)
    assert kinds.any() and not kinds.all(), "the case does not mix query-aware and vertical-slash heads"
    ref = reference.masked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), _masks(sel, lengths, t, block, hq))
    for b, length in enumerate(lengths):
        assert_matches(out[b, :length], ref[b, :length], backend.dtype, f"{backend.name} row {b}")


def test_table_gives_the_recomputed_mask():
    """The 64-token table of a selection (query-aware heads at block 128, vertical-slash heads with
    columns) describes exactly ``flexprefill.mask``, each block and column once."""
    t, lengths, hq, hkv, d, block, selection = CASES["gqa4_group_d64_b128"]
    q, k, _ = random_qkv(9, len(lengths), t, hq, hkv, d, jnp.float32)
    tau = _mixed_tau(q, k, lengths, block, selection)
    sel = flexprefill.select(q, k, gamma=0.6, tau=tau, block=block, max_blocks=3, vertical=20, slash=30,
                             force_vertical=2, force_slash=3, length=jnp.asarray(lengths), selection=selection)
    padded = 320
    table = dynamic_tables.flexprefill(sel, jnp.asarray(lengths), padded, block)
    masks = flexprefill.mask(sel, lengths, padded, block)
    assert not table.relative and table.block_q == table.block_kv == 64
    for b, length in enumerate(lengths):
        for h in range(masks.shape[1]):
            np.testing.assert_array_equal(table_mask(table, b, h, length), masks[b, h], err_msg=f"row {b} head {h}")


def _injected(selection, length, *, seq_len: int, block: int, q_heads: int) -> np.ndarray:
    """Bool ``[B, Hq, T, T]`` masks (host side, for ``jax.pure_callback``)."""
    return _masks(flexprefill.FlexSelection(*selection), np.asarray(length), seq_len, block, q_heads)


@pytest.mark.parametrize("tau", [1.0, 0.0], ids=["query_aware", "vertical_slash"])
def test_model_with_flexprefill_equals_injected_masks(tmp_path, tau):
    """``TriangleMix(2, shallow=FlexPrefill)`` and ``FlexPrefill`` alone in a 4-layer model = dense
    float32 attention with ``flexprefill.mask`` of the layer's own selection (and the triangle mask
    from layer 2 on), injected through the decoder's attention hook; ``tmjax.prefill`` agrees."""
    import hf_fixtures
    from tmjax import api, plan

    params = hf_fixtures.load_tmjax(hf_fixtures.save_tiny_model(tmp_path, "llama", num_hidden_layers=4))
    t = 300
    pattern = tmjax.FlexPrefill(tau=tau, block=64, **dict(OPTIONS, vertical=8, slash=4, force_slash=2))
    layout = tmjax.TriangleMix(2, n_init=4, n_local=64, n_last=32, shallow=pattern)
    tokens = np.random.default_rng(0).integers(0, params.config.vocab_size, size=(2, t), dtype=np.int32)
    tri = reference.triangle_mask(t, layout.n_init, layout.n_local, layout.n_last)

    def picks(q, k, length):
        return (tuple(flexprefill.select(q, k, gamma=pattern.gamma, tau=tau, block=64, max_blocks=pattern.max_blocks,
                                         vertical=pattern.vertical, slash=pattern.slash,
                                         force_vertical=pattern.force_vertical, force_slash=pattern.force_slash,
                                         length=length, selection=pattern.selection)),)

    hook = injected_hook(layout.switch_layer, tri, functools.partial(_injected, block=64), picks)

    full = jax.jit(plan.full_logits, static_argnames=("layout", "attention_fn"))
    expected = full(params, tokens, attention_fn=hook)
    ours = full(params, tokens, layout=layout)
    hf_fixtures.assert_close_to_scale(ours, expected, tol=1e-5)
    logits, _ = api.prefill(params, tokens, layout)  # bucketed: padded past T
    hf_fixtures.assert_close_to_scale(logits, expected[:, -1], tol=1e-5)
    dense = full(params, tokens, layout=tmjax.TriangleMix(2, n_init=4, n_local=64, n_last=32))
    assert np.max(np.abs(np.asarray(dense - ours))) > 1e-2 * np.max(np.abs(np.asarray(ours))), \
        "FlexPrefill changed nothing at this length: the test would not see a wrong pattern"
    alone = full(params, tokens, layout=pattern)
    expected = full(params, tokens, attention_fn=injected_hook(params.config.num_layers, tri, functools.partial(_injected, block=64), picks))
    hf_fixtures.assert_close_to_scale(alone, expected, tol=1e-5)
    assert np.asarray(api.generate(params, tokens[:1, :200], 3, pattern)).shape[-1] == 3
