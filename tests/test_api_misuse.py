"""API misuse: each wrong argument gives a TypeError or ValueError that names it (checked on the host,
before anything is traced), what a JAX user naturally passes (numpy and jnp scalars) is accepted and
means the same as the Python value, and a prompt past max_position_embeddings warns once."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax import api
from tmjax.models.config import ModelConfig
from tmjax.models.params import init_params

CONFIG = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=300)
TOKENS = np.arange(1, 13, dtype=np.int32)[None].repeat(2, axis=0)  # [2, 12]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def cache(params):
    return tmjax.prefill(params, TOKENS, max_new_tokens=4)[1]


@pytest.mark.parametrize("layout", [{"switch_layer": 1}, 1, "TriangleMix(1)"])
def test_layout_must_be_a_layout(params, layout):
    for call in (lambda: tmjax.prefill(params, TOKENS, layout), lambda: tmjax.generate(params, TOKENS, 2, layout)):
        with pytest.raises(TypeError, match="layout must be None"):
            call()


@pytest.mark.parametrize("bad", [None, "ckpt/", {"weights": {}}])
def test_params_must_be_params(params, cache, bad):
    calls = [lambda: tmjax.prefill(bad, TOKENS), lambda: tmjax.generate(bad, TOKENS, 2),
             lambda: tmjax.decode_step(bad, TOKENS[:, 0], cache),
             lambda: api.generate_from(bad, jnp.zeros((2, 97)), cache, 2)]
    for call in calls:
        with pytest.raises(TypeError, match=r"params must be tmjax Params \(params = tmjax.load"):
            call()


def test_cache_must_be_a_cache_of_this_model(params, cache):
    with pytest.raises(TypeError, match="cache must be the KVCache"):
        tmjax.decode_step(params, TOKENS[:, 0], None)
    other = init_params(ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                                    num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16), jax.random.key(1))
    with pytest.raises(ValueError, match="cache .* does not belong to this model"):
        tmjax.decode_step(other, TOKENS[:, 0], cache)
    with pytest.raises(TypeError, match="donate must be a bool"):
        tmjax.decode_step(params, TOKENS[:, 0], cache, donate="yes")
    with pytest.raises(ValueError, match="token: 3 tokens for a cache of batch 2"):
        tmjax.decode_step(params, np.zeros(3, np.int32), cache)


@pytest.mark.parametrize("temperature, error", [("hot", TypeError), (None, TypeError), (True, TypeError),
                                                ([0.5], TypeError), (-1.0, ValueError), (float("nan"), ValueError)])
def test_bad_temperature(params, temperature, error):
    with pytest.raises(error, match="temperature must be"):
        tmjax.generate(params, TOKENS, 2, temperature=temperature, key=jax.random.key(0))


@pytest.mark.parametrize("temperature", [jnp.float32(0.5), np.float64(0.5), jnp.asarray(0.5)])
def test_numpy_and_jnp_temperatures_mean_the_python_number(params, temperature):
    expected = tmjax.generate(params, TOKENS, 4, temperature=0.5, key=jax.random.key(3))
    np.testing.assert_array_equal(tmjax.generate(params, TOKENS, 4, temperature=temperature, key=jax.random.key(3)),
                                  expected)


@pytest.mark.parametrize("eos, error, needle", [
    (52.9, TypeError, "eos_token_id must be a token id"), ("</s>", TypeError, "eos_token_id must be a token id"),
    (True, TypeError, "eos_token_id must be a token id"), ([3, 4.5], TypeError, "eos_token_id must be a token id"),
    (10**10, ValueError, r"eos_token_id must be in \[0, 97\)"), (-1, ValueError, r"eos_token_id must be in \[0, 97\)"),
])
def test_bad_eos_token_id(params, eos, error, needle):
    with pytest.raises(error, match=needle):
        tmjax.generate(params, TOKENS, 2, eos_token_id=eos)


def test_numpy_and_jnp_ids_and_counts_mean_the_python_ints(params):
    free = np.asarray(tmjax.generate(params, TOKENS, 6))
    eos = int(free[0, 1])
    expected = np.asarray(tmjax.generate(params, TOKENS, 6, eos_token_id=eos))
    for same in (np.int64(eos), jnp.int32(eos), np.asarray([eos]), jnp.asarray([eos, eos])):
        np.testing.assert_array_equal(tmjax.generate(params, TOKENS, np.int64(6), eos_token_id=same), expected)
    np.testing.assert_array_equal(tmjax.generate(params, TOKENS, jnp.int32(6)), free)


@pytest.mark.parametrize("count, error", [("3", TypeError), (2.5, TypeError), (True, TypeError), (0, ValueError)])
def test_bad_max_new_tokens(params, count, error):
    with pytest.raises(error, match="max_new_tokens must be"):
        tmjax.generate(params, TOKENS, count)


def test_max_new_tokens_past_the_cap_is_refused(params):
    """The documented cap: max_position_embeddings (300 here) or 1024 if larger, refused before any
    model work (10**9 used to end in XLA's out-of-memory error)."""
    needle = r"max_new_tokens must be at most 1024 \(the model's max_position_embeddings 300, or 1024 if larger\), got "
    for count in (1025, 10**9):
        with pytest.raises(ValueError, match=needle + str(count)):
            tmjax.prefill(params, TOKENS, max_new_tokens=count)
        with pytest.raises(ValueError, match=needle + str(count)):
            tmjax.generate(params, TOKENS, count)
    assert tmjax.prefill(params, TOKENS, max_new_tokens=1024)[1].max_length >= 12 + 1024  # the cap itself runs
    big = dataclasses.replace(CONFIG, max_position_embeddings=2000)  # a model with more positions: its own cap
    with pytest.raises(ValueError, match=r"at most 2000 \(the model's max_position_embeddings 2000"):
        tmjax.prefill(init_params(big, jax.random.key(0)), TOKENS, max_new_tokens=2001)


def test_other_arguments_are_named(params):
    cases = [
        (lambda: tmjax.generate(params, TOKENS, 2, temperature=0.5, key="seed"), TypeError, "key must be a PRNG key"),
        (lambda: tmjax.generate(params, TOKENS, 2, temperature=0.5, key=7), TypeError, "key must be a PRNG key"),
        (lambda: tmjax.prefill(params, TOKENS, implementation="cuda"), ValueError, "implementation must be None"),
        (lambda: tmjax.prefill(params, TOKENS, implementation=["xla"]), ValueError, "implementation must be None"),
        (lambda: tmjax.prefill(params, "hello"), TypeError, "tokens must be integers"),
        (lambda: tmjax.prefill(params, TOKENS, lengths=[3]), ValueError, r"lengths must have shape \[2\]"),
        (lambda: tmjax.prefill(params, TOKENS, lengths=[3, 13]), ValueError, r"lengths must be in \[1, 12\]"),
        (lambda: tmjax.prefill(params, TOKENS, lengths=[3.0, 4.0]), TypeError, "lengths must be integers"),
        (lambda: tmjax.prefill(params, TOKENS, lengths=[True, 12]), TypeError, "lengths must be integers, not booleans"),
        (lambda: tmjax.prefill(params, TOKENS, lengths=(np.True_, 12)), TypeError, "not booleans"),
        (lambda: tmjax.prefill(params, [TOKENS[0], []]), ValueError, r"tokens\[1\] is empty"),
        (lambda: tmjax.prefill(params, [TOKENS[0], TOKENS[1, :3]], lengths=[1, 2]), ValueError, "lengths: a list"),
    ]
    for call, error, needle in cases:
        with pytest.raises(error, match=needle):
            call()


@pytest.mark.parametrize("fn", [tmjax.triangle_attention, tmjax.causal_attention])
def test_attention_inputs_are_named(fn):
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(TypeError, match="q must be a jax or numpy array"):
        fn(q.tolist(), q, q)
    with pytest.raises(TypeError, match="q must be a floating-point array, got dtype int32"):
        fn(*(jnp.zeros((1, 8, 2, 16), jnp.int32),) * 3)
    empty = jnp.zeros((1, 0, 2, 16))
    with pytest.raises(ValueError, match=r"must not be empty \(T = 0") as err:
        fn(empty, empty, empty)
    assert "length" not in str(err.value)  # no length was passed


def test_a_prompt_past_max_position_embeddings_warns_once(params, monkeypatch):
    monkeypatch.setattr(api, "_WARNED_POSITIONS", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tmjax.prefill(params, np.ones(300, np.int32))  # at the limit: silent
        tmjax.prefill(params, np.ones(310, np.int32))
        tmjax.generate(params, np.ones(320, np.int32), 2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "310 tokens" in messages[0] and "max_position_embeddings (300)" in messages[0]
    assert caught[0].filename == __file__  # points at the caller's line
