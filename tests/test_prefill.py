"""prefill / decode_step / generate: TriangleMix layers against dense attention with the triangle mask,
padding and bucketing invariance, decoding after a Triangle prefill, generation, and bad input."""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures
from tmjax import api, plan
from tmjax.layout import TriangleMix
from tmjax.models import decoder
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, init_params, param_shapes
from tmjax.pallas_kernels.reference import causal_mask, masked_attention, triangle_mask

# Small enough that the triangle hides keys at T = 28: sinks 2, window 4, last 3 rows dense.
LAYOUT = TriangleMix(switch_layer=1, n_init=2, n_local=4, n_last=3)
T = 28
# name -> (family, overrides) of the tiny models (large random weights); test_batch_lengths uses them too
MODELS = {
    "llama": ("llama", dict(num_hidden_layers=3)),
    "qwen3": ("qwen3", dict(head_dim=32, num_hidden_layers=3)),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "mistral-window100": ("mistral", dict(sliding_window=100)),
    # the base grows with the true length: 28 > 16 positions
    "dynamic": ("llama", dict(max_position_embeddings=16,
                              rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> our Params of ``MODELS[name]``."""
    build = hf_fixtures.tiny_models(tmp_path_factory, MODELS)
    return lambda name: build(name)[1]


def _tokens(seed: int, length: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, length), dtype=np.int32)


def _reference_attention(switch_layer: int, masks_by_kind: dict) -> decoder.AttentionFn:
    """Dense float32 attention with an explicit mask: ``masks_by_kind['triangle']`` at and above the
    switch layer, ``masks_by_kind['dense']`` below."""

    def attend(layer, q, k, v, length):
        return jnp.where(layer >= switch_layer, masked_attention(q, k, v, masks_by_kind["triangle"]),
                         masked_attention(q, k, v, masks_by_kind["dense"]))

    return attend


_full_logits = jax.jit(plan.full_logits, static_argnames=("layout", "attention_fn"))


def test_layout_equals_dense_attention_with_the_triangle_mask(models):
    params = models("llama")
    tokens = _tokens(0, T)
    masks = {"triangle": triangle_mask(T, LAYOUT.n_init, LAYOUT.n_local, LAYOUT.n_last), "dense": causal_mask(T)}
    reference = _full_logits(params, tokens, attention_fn=_reference_attention(LAYOUT.switch_layer, masks))
    ours = _full_logits(params, tokens, layout=LAYOUT)
    hf_fixtures.assert_close_to_scale(ours, reference, tol=1e-5)
    # the bucketed public prefill (prompt padded to 128) gives the same last-position logits
    logits, _ = api.prefill(params, tokens, LAYOUT)
    hf_fixtures.assert_close_to_scale(logits, reference[:, -1], tol=1e-5)
    # and the triangle really changed the model at this length
    dense = _full_logits(params, tokens)
    assert np.max(np.abs(np.asarray(dense - ours))) > 1e-2 * np.max(np.abs(np.asarray(dense)))


@pytest.mark.parametrize("name, layout", [("llama", LAYOUT), ("mistral-window", None), ("dynamic", None)])
def test_padding_changes_nothing(models, name, layout):
    """The public prefill pads 28 tokens to 128; the logits and the cache's real positions equal an
    unpadded run (the dynamic-RoPE model's base depends on the true length, 28 > 16 positions)."""
    params = models(name)
    tokens = _tokens(1, T)
    logits, cache = api.prefill(params, tokens, layout)
    hidden, exact = jax.jit(decoder.prefill_hidden, static_argnames=("runs",))(
        params, tokens, T, runs=plan.layer_runs(params.config, layout, T))
    assert cache.max_length >= 128 + 256 and cache.length.tolist() == [T, T]
    chex.assert_trees_all_close(logits, decoder.logits(params, hidden[:, -1]), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close((cache.k[:, :, :T], cache.v[:, :, :T]), (exact.k, exact.v), atol=1e-5, rtol=1e-5)


def test_prompt_lengths_in_one_bucket_compile_once(monkeypatch):
    config = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    params = init_params(config, jax.random.key(0))
    traces = []
    real = decoder.prefill_hidden
    monkeypatch.setattr(decoder, "prefill_hidden", lambda *a, **k: traces.append(a[1].shape) or real(*a, **k))
    for length in (5, 77, 128):
        api.prefill(params, _tokens(length, length, batch=1) % 97)
    assert traces == [(1, 128)]
    api.prefill(params, _tokens(2, 129, batch=1) % 97)
    assert traces == [(1, 128), (1, 256)]
    # a batch of different lengths compiles once per bucket of its longest row
    for lengths in ((5, 77), (128, 3), (40, 40)):
        api.prefill(params, [np.ones(n, np.int32) for n in lengths])
    api.prefill(params, [np.ones(n, np.int32) for n in (129, 4)])
    assert traces == [(1, 128), (1, 256), (2, 128), (2, 256)]


@pytest.mark.parametrize("bucket_input, expected", [(1, 128), (128, 128), (129, 256), (1024, 1024), (1025, 1152),
                                                    (2048, 2048), (3858, 3968), (4097, 4352), (5000, 5120),
                                                    (100_000, 102_400)])
def test_bucket_length_rule(bucket_input, expected):
    assert api.bucket_length(bucket_input) == expected


def test_bucket_waste_stays_under_a_sixteenth():
    for length in np.random.default_rng(0).integers(2049, 1 << 20, size=500):
        bucket = api.bucket_length(int(length))
        assert bucket % 128 == 0 and length <= bucket < length * 1.0625


def test_decode_after_a_triangle_prefill_is_dense(models):
    """Prompt rows see the triangle of length T; each new token then attends to every cached key."""
    params = models("llama")
    steps = 3
    tokens = _tokens(2, T + steps)
    logits, cache = api.prefill(params, tokens[:, :T], LAYOUT)
    ours = [logits]
    for t in range(T, T + steps):
        logits, cache = api.decode_step(params, tokens[:, t], cache)
        ours.append(logits)
    n = T + steps
    triangle = causal_mask(n)
    triangle[:T, :T] = triangle_mask(T, LAYOUT.n_init, LAYOUT.n_local, LAYOUT.n_last)
    reference = _full_logits(params, tokens,
                             attention_fn=_reference_attention(LAYOUT.switch_layer,
                                                               {"triangle": triangle, "dense": causal_mask(n)}))
    hf_fixtures.assert_close_to_scale(np.stack(ours, axis=1), reference[:, T - 1:], tol=1e-5)


def test_generate_equals_the_step_by_step_greedy_loop(models):
    params = models("qwen3")
    tokens = _tokens(3, T)
    logits, cache = api.prefill(params, tokens, LAYOUT)
    expected = [np.argmax(np.asarray(logits), axis=-1)]
    for _ in range(5):
        logits, cache = api.decode_step(params, expected[-1].astype(np.int32), cache)
        expected.append(np.argmax(np.asarray(logits), axis=-1))
    expected = np.stack(expected, axis=1)
    np.testing.assert_array_equal(api.generate(params, tokens, 6, LAYOUT), expected)


def test_generate_stops_at_eos_and_pads_with_it(models):
    params = models("llama")
    tokens = _tokens(4, 20, batch=3)
    free = np.asarray(api.generate(params, tokens, 8))
    eos = int(free[0, 2])
    expected = free.copy()
    for row in expected:  # everything after a row's first EOS becomes EOS
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0]:] = eos
    assert not np.array_equal(expected, free)
    np.testing.assert_array_equal(api.generate(params, tokens, 8, eos_token_id=eos), expected)
    unused = next(i for i in range(params.config.vocab_size) if i not in free)  # an id that never comes up
    np.testing.assert_array_equal(api.generate(params, tokens, 8, eos_token_id=[unused, eos]), expected)
    # an unbatched prompt whose row finishes stops decoding early and still returns a full row
    np.testing.assert_array_equal(api.generate(params, tokens[0], 8, eos_token_id=eos), expected[0])
    # unbatched prefill / decode_step: [V] logits, and they continue the greedy sequence
    logits, cache = api.prefill(params, tokens[0])
    assert logits.shape == (params.config.vocab_size,) and int(np.argmax(logits)) == free[0, 0]
    logits, _ = api.decode_step(params, np.int32(free[0, 0]), cache)
    assert logits.shape == (params.config.vocab_size,) and int(np.argmax(logits)) == free[0, 1]


def test_sampling(models):
    params = models("llama")
    tokens = _tokens(5, 20, batch=3)  # the shapes of the EOS test: greedy is compiled already
    greedy = api.generate(params, tokens, 8)
    cold = api.generate(params, tokens, 8, temperature=1e-6, key=jax.random.key(1))
    np.testing.assert_array_equal(cold, greedy)
    a = api.generate(params, tokens, 8, temperature=1.0, key=jax.random.key(2))
    b = api.generate(params, tokens, 8, temperature=1.0, key=jax.random.key(2))
    c = api.generate(params, tokens, 8, temperature=1.0, key=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_init_params_follows_param_shapes():
    config = ModelConfig(architecture="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, qkv_bias=True, o_bias=True)
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params.weights, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(config, jnp.bfloat16)))
    assert "lm_head" in params.weights and bool(jnp.all(params.weights["norm"]["scale"] == 1))
    assert float(jnp.std(params.weights["layers"]["mlp"]["up_proj"]["kernel"].astype(jnp.float32))) > 0.01


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "tokens, needle",
    [
        (np.zeros((1, 2, 8), np.int32), "shape"),
        (np.full((1, 8), 256, np.int32), "token ids"),
        (np.full((1, 8), -1, np.int32), "token ids"),
        (np.zeros((1, 0), np.int32), "empty"),
    ],
)
def test_bad_tokens_raise(models, tokens, needle):
    params = models("llama")
    with pytest.raises(TypeError, match="integers"):
        api.prefill(params, tokens.astype(np.float32))
    with pytest.raises(ValueError, match=needle):
        api.prefill(params, tokens)
    with pytest.raises(ValueError, match=needle):
        api.generate(params, tokens, 2)


def test_bad_arguments_raise(models):
    params = models("llama")
    tokens = _tokens(6, 16)
    with pytest.raises(ValueError, match="switch_layer=4"):
        api.prefill(params, tokens, TriangleMix(switch_layer=4))
    with pytest.raises(ValueError, match="switch_layer=4"):
        api.generate(params, tokens, 2, TriangleMix(switch_layer=4))
    with pytest.raises(ValueError, match="longer than the cache"):
        decoder.prefill_hidden(params, tokens, 16, runs=plan.layer_runs(params.config, None, 16), cache_size=8)
    with pytest.raises(ValueError, match="key"):
        api.generate(params, tokens, 2, temperature=0.7)
    with pytest.raises(ValueError, match="temperature"):
        api.generate(params, tokens, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        api.generate(params, tokens, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        api.prefill(params, tokens, max_new_tokens=-1)
    _, cache = api.prefill(params, tokens)
    with pytest.raises(ValueError, match="batch"):
        api.decode_step(params, np.zeros(3, np.int32), cache)
    _, full = api.prefill(params, _tokens(7, 128), max_new_tokens=0)
    with pytest.raises(ValueError, match="cache is full"):
        api.decode_step(params, np.zeros(2, np.int32), full)


def test_triangle_on_a_windowed_layer_raises(models):
    params = models("mistral-window")
    with pytest.raises(ValueError, match="sliding window of 8"):
        api.prefill(params, _tokens(8, T), LAYOUT)


def test_triangle_on_a_windowed_layer_follows_the_true_prompt_length(models):
    """A window of 100 hides nothing from a 28-token prompt, even though the bucket is 128 long: the
    triangle alone is exact there. A 150-token prompt is refused, naming both numbers."""
    params = models("mistral-window100")
    tokens = _tokens(10, T)
    masks = {"triangle": triangle_mask(T, LAYOUT.n_init, LAYOUT.n_local, LAYOUT.n_last), "dense": causal_mask(T)}
    reference = _full_logits(params, tokens, attention_fn=_reference_attention(LAYOUT.switch_layer, masks))
    logits, _ = api.prefill(params, tokens, LAYOUT)
    hf_fixtures.assert_close_to_scale(logits, reference[:, -1], tol=1e-5)
    with pytest.raises(ValueError, match="window of 100 < the prompt length 150"):
        api.prefill(params, _tokens(10, 150), LAYOUT)
    with pytest.raises(ValueError, match="window of 100 < the prompt length 150"):
        api.generate(params, [tokens[0], _tokens(11, 150)[0]], 2, LAYOUT)


def test_bfloat16_weights_run_in_bfloat16(models):
    """bf16 weights give a bf16 cache and float32 logits close to the float32 model's."""
    params = models("llama")
    half = Params(params.config, jax.tree.map(lambda w: w.astype(jnp.bfloat16), params.weights))
    tokens = _tokens(9, T)
    reference, _ = api.prefill(params, tokens, LAYOUT)
    logits, cache = api.prefill(half, tokens, LAYOUT)
    assert cache.k.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    hf_fixtures.assert_close_to_scale(logits, reference, tol=5e-2)
