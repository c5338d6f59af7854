"""The Flax port against transformers (float32, eager attention) on tiny random models of every family
and RoPE variant: whole-prompt logits, prefill + step-by-step decode, greedy generation, and the
config / RoPE / weight-tree rules the port depends on."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import hf_fixtures
from tmjax import api, plan
from tmjax.convert.mapping import weights_from_hf
from tmjax.models import decoder
from tmjax.models.config import ModelConfig
from tmjax.models.params import param_shapes
from tmjax.models.rope import attention_scaling, inverse_frequencies, rope_tables

CASES = {
    "llama": ("llama", {}),
    "llama-biases-tied": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-window-layer1": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    # per-layer types that max_window_layers cannot express (it would window layers >= 28: none here)
    "qwen2-layer-types": ("qwen2", dict(use_sliding_window=True, sliding_window=8, num_hidden_layers=3,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "qwen3-nonsquare": ("qwen3", dict(head_dim=32, num_hidden_layers=3)),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))),
    "rope-llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=64,
                                                       rope_theta=10000.0))),
    "rope-yarn": ("qwen2", dict(max_position_embeddings=64,
                                rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                     original_max_position_embeddings=16))),
    # max_position_embeddings 16 < the prompt, so the dynamic base actually grows
    "rope-dynamic": ("llama", dict(max_position_embeddings=16,
                                   rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
}
PROMPT, TOTAL = 24, 32  # decode tests: prefill 24 tokens, then 8 single-token steps


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> folder of the saved tiny model (each built once per module)."""

    @functools.cache
    def build(name: str):
        family, overrides = CASES[name]
        return hf_fixtures.save_tiny_model(tmp_path_factory.mktemp(name), family, **overrides)

    return build


def _tokens(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(2, length), dtype=np.int32)


_full_logits = jax.jit(plan.full_logits)


@pytest.mark.parametrize("name", CASES)
def test_whole_prompt_logits_match_transformers(saved, name):
    path = saved(name)
    tokens = _tokens(1, TOTAL)
    ours = _full_logits(hf_fixtures.load_tmjax(path), tokens)
    hf_fixtures.assert_close_to_scale(ours, hf_fixtures.hf_logits(path, tokens))


@pytest.mark.parametrize("name", CASES)
def test_prefill_then_decode_matches_transformers(saved, name):
    path = saved(name)
    params = hf_fixtures.load_tmjax(path)
    tokens = _tokens(2, TOTAL)
    logits, cache = api.prefill(params, tokens[:, :PROMPT])
    steps = [logits]
    for t in range(PROMPT, TOTAL):
        logits, cache = api.decode_step(params, tokens[:, t], cache)
        steps.append(logits)
    assert cache.length.tolist() == [TOTAL] * tokens.shape[0]
    if CASES[name][1].get("rope_parameters", {}).get("rope_type") == "dynamic":
        # transformers' cached decoding grows the dynamic base per step; a full forward uses the final one
        reference = hf_fixtures.hf_cached_logits(path, tokens, PROMPT)
    else:
        reference = hf_fixtures.hf_logits(path, tokens)[:, PROMPT - 1:]
    hf_fixtures.assert_close_to_scale(np.stack(steps, axis=1), reference)


def test_greedy_generate_matches_transformers(saved):
    path = saved("qwen3-nonsquare")
    tokens = _tokens(3, 20)
    ours = api.generate(hf_fixtures.load_tmjax(path), tokens, 6)
    model = hf_fixtures.load_hf(path)
    with torch.no_grad():
        theirs = model.generate(torch.as_tensor(tokens, dtype=torch.long), max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), theirs[:, 20:].numpy())


# --- bfloat16 against transformers' bfloat16 model ----------------------------------------------------

def _bfloat16(params):
    return type(params)(params.config, jax.tree.map(lambda w: w.astype(jnp.bfloat16), params.weights))


@pytest.mark.parametrize("name", ["llama", "llama-biases-tied", "qwen2-tied", "qwen3-nonsquare", "mistral-window"])
def test_bfloat16_logits_match_transformers_bfloat16(saved, name):
    """bf16 weights, 64-token prompts: our logits against transformers' bf16 model with the same weights.

    The two round differently by design (our attention scores and softmax are float32, transformers'
    eager scores are bf16; XLA keeps some fused intermediates in float32), so they agree to bf16 noise:
    measured (3 seeds x these 5 models) max |diff| <= 3.6e-2 and mean |diff| <= 3.6e-3 of max |logit|,
    the same size as transformers' own bf16-vs-float32 spread (<= 3.9e-2, <= 3.8e-3). Bounds: 6e-2 and
    6e-3. This is a band for gross bf16 errors; the rounding order itself is pinned by the next test."""
    path = saved(name)
    tokens = _tokens(5, 64)
    ours = np.asarray(_full_logits(_bfloat16(hf_fixtures.load_tmjax(path)), tokens))
    reference = hf_fixtures.hf_logits(path, tokens, torch.bfloat16)
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 6e-2 * scale
    assert np.abs(ours - reference).mean() <= 6e-3 * scale


@pytest.mark.parametrize("name", ["llama", "qwen3-nonsquare"])
def test_bfloat16_rounding_matches_transformers_bfloat16(saved, name):
    """Every token id alone (T = 1, so attention returns V exactly and its score precision cannot
    matter), compiled with ``xla_allow_excess_precision=False`` so that XLA performs every bf16
    rounding the model code asks for: the logits, rounded to bf16 like transformers', are bit-identical
    to transformers' bf16 model for >= 99% of entries (measured: 99.7% llama, 100% qwen3; the rest
    differ by an accumulation-order ulp). An RMSNorm that scales before casting back leaves ~16%
    identical. At T = 1 queries and keys do not matter, so q/k-norm and RoPE are only in the band above.
    Models with q/k/v biases are left out: torch adds a bias inside its bf16 GEMM (one rounding), we
    after it (two)."""
    if jax.default_backend() != "cpu":
        pytest.skip("bit-level agreement with torch's CPU kernels is a CPU property")
    path = saved(name)
    params = _bfloat16(hf_fixtures.load_tmjax(path))
    tokens = np.arange(params.config.vocab_size, dtype=np.int32)[:, None]
    program = jax.jit(plan.full_logits).lower(params, tokens).compile(
        compiler_options={"xla_allow_excess_precision": False})
    ours = np.asarray(program(params, tokens)).astype(jnp.bfloat16).astype(np.float32)
    reference = hf_fixtures.hf_logits(path, tokens, torch.bfloat16)
    identical = float(np.mean(ours == reference))
    assert identical >= 0.99, f"{identical:.1%} of bf16 logits identical to transformers'"


# --- RoPE -----------------------------------------------------------------------------------------

ROPES = {
    "default": {},
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=16.0),
}


@pytest.mark.parametrize("kind", ROPES)
@pytest.mark.parametrize("seq_len", [None, 40, 300])
def test_inverse_frequencies_match_transformers(kind, seq_len):
    hf = transformers.LlamaConfig(**{**hf_fixtures.TINY, "max_position_embeddings": 32, "head_dim": 32,
                                     "rope_parameters": {"rope_theta": 50000.0, **ROPES[kind]}})
    ours = ModelConfig.from_hf(hf.to_dict())
    if kind == "default":
        dim = ours.head_dim
        theirs = 1.0 / (50000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    else:
        theirs = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=seq_len)
    np.testing.assert_allclose(np.asarray(inverse_frequencies(ours, seq_len)), theirs[0].numpy(), rtol=2e-6)
    assert attention_scaling(ours.rope) == pytest.approx(theirs[1], rel=1e-12)


# Realistic YaRN settings: the ramp between beta_fast and beta_slow spans many dimensions, so an
# off-by-one in its ends is a large frequency error (the tiny configs above make it ~1 dimension wide).
QWEN25_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768, rope_theta=1e6)
REALISTIC_YARN = {
    "qwen2.5": (128, QWEN25_YARN),
    "no-truncate": (128, {**QWEN25_YARN, "truncate": False}),
    "explicit-attention-factor": (128, {**QWEN25_YARN, "attention_factor": 1.25}),
    # DeepSeek-style: attention factor mscale(factor, 0.707) / mscale(factor, 1.0), betas set
    "mscale": (64, dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, rope_theta=10000.0,
                        mscale=0.707, mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0)),
}
FAR_POSITIONS = [0, 1, 777, 4095, 30000, 32768, 100000, 131071]


def _realistic_yarn_config(name: str) -> transformers.Qwen2Config:
    head_dim, rope = REALISTIC_YARN[name]
    return transformers.Qwen2Config(**{**hf_fixtures.TINY, "hidden_size": 2 * head_dim, "num_attention_heads": 2,
                                       "num_key_value_heads": 1, "max_position_embeddings": 131072,
                                       "rope_parameters": rope})


@pytest.mark.parametrize("name", REALISTIC_YARN)
def test_realistic_yarn_matches_transformers_rope_tables(name):
    """Inverse frequencies, attention factor, and the cos/sin tables at positions up to 128K against
    transformers' own rotary embedding module."""
    hf = _realistic_yarn_config(name)
    ours = ModelConfig.from_hf(hf.to_dict())
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    np.testing.assert_allclose(np.asarray(inverse_frequencies(ours)), inv_freq.numpy(), rtol=2e-6)
    assert attention_scaling(ours.rope) == pytest.approx(factor, rel=1e-12)
    assert factor != 1.0  # every case scales cos/sin, so a wrong factor rule shows
    rotary = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(hf)
    positions = torch.tensor([FAR_POSITIONS])
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, len(FAR_POSITIONS), ours.head_dim), positions)
    our_cos, our_sin = rope_tables(ours, jnp.asarray(FAR_POSITIONS))
    # float32 frequencies may differ by an ulp (numpy vs torch pow): the angle p * f then differs by up
    # to ~p * f * 2.4e-7; allow 3 ulps of that plus rounding of cos/sin themselves.
    angle = np.asarray(FAR_POSITIONS, np.float64)[:, None] * np.tile(inv_freq.numpy(), 2)[None]
    allowed = factor * (3 * 1.2e-7 * angle + 2e-6)
    assert np.all(np.abs(np.asarray(our_cos) - cos[0].numpy()) <= allowed)
    assert np.all(np.abs(np.asarray(our_sin) - sin[0].numpy()) <= allowed)


@pytest.mark.parametrize("name", ["qwen2.5", "no-truncate"])
def test_realistic_yarn_logits_match_transformers(tmp_path, name):
    """A 2-layer Qwen2 with Qwen2.5's RoPE: logits of a 640-token prompt against transformers. The
    ramp's dimensions have wavelengths ~900 to ~35K tokens, so their rotation at positions in the
    hundreds is far from zero and a frequency error there moves the logits."""
    _, rope = REALISTIC_YARN[name]
    head_dim = 128
    path = hf_fixtures.save_tiny_model(tmp_path, "qwen2", hidden_size=2 * head_dim, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=131072, rope_parameters=rope)
    tokens = _tokens(4, 640)[:1]
    ours = _full_logits(hf_fixtures.load_tmjax(path), tokens)
    # float32 differences grow along 640 positions: median 4e-6, worst position 1.3e-4 of max |logit|
    # (transformers 5.23, jax 0.10.2 CPU); the ramp's floor/ceil swapped gives 0.30, truncate ignored 0.19.
    hf_fixtures.assert_close_to_scale(ours, hf_fixtures.hf_logits(path, tokens), tol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "yarn"])
@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_legacy_rope_scaling_parses_like_transformers_v5(kind, key):
    """Legacy ``rope_theta`` + ``rope_scaling`` gives the config transformers' own v5 rewrite gives."""
    scaling = {key: kind, **{k: v for k, v in ROPES[kind].items() if k != "rope_type"}}
    legacy = {**hf_fixtures.TINY, "model_type": "llama", "rope_theta": 50000.0, "rope_scaling": scaling}
    v5 = transformers.LlamaConfig(**{k: v for k, v in legacy.items() if k != "model_type"}).to_dict()
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(legacy).rope.kind == kind and ModelConfig.from_hf(legacy).rope.theta == 50000.0


# --- config -----------------------------------------------------------------------------------------

def test_family_rules_from_transformers_configs():
    qwen2 = ModelConfig.from_hf(transformers.Qwen2Config(**hf_fixtures.TINY).to_dict())
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_window) == (True, False, None)
    qwen2w = ModelConfig.from_hf(transformers.Qwen2Config(**hf_fixtures.TINY, use_sliding_window=True,
                                                          sliding_window=8, max_window_layers=1).to_dict())
    assert [qwen2w.layer_window(i) for i in range(2)] == [None, 8]
    qwen3 = ModelConfig.from_hf({**hf_fixtures.TINY, "model_type": "qwen3"})  # head_dim absent: 128
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias) == (128, True, False)
    mistral = ModelConfig.from_hf(transformers.MistralConfig(**hf_fixtures.TINY, sliding_window=8).to_dict())
    assert [mistral.layer_window(i) for i in range(2)] == [8, 8] and not mistral.qkv_bias
    llama = ModelConfig.from_hf(transformers.LlamaConfig(**hf_fixtures.TINY, attention_bias=True).to_dict())
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.head_dim) == (True, True, False, 16)
    assert ModelConfig.from_hf({**hf_fixtures.TINY, "architectures": ["MistralForCausalLM"]}).architecture == "mistral"


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(model_type="gpt2"), "gpt2"),
        (dict(hidden_act="gelu"), "gelu"),
        (dict(rope_scaling=dict(rope_type="longrope", factor=2.0)), "longrope"),
        (dict(rope_parameters=dict(rope_type="default", mrope_section=[2, 2])), "mrope_section"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(rope_parameters=dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0)), "low_freq_factor"),
        (dict(rope_parameters=dict(rope_type="linear")), "factor"),
        (dict(num_hidden_layers=None), "num_hidden_layers"),
        (dict(num_key_value_heads=3), "num_kv_heads"),
    ],
)
def test_unsupported_configs_raise_naming_the_problem(change, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf({**hf_fixtures.TINY, "model_type": "llama", **change})


@pytest.mark.parametrize("name", ["llama-biases-tied", "qwen2-tied", "qwen3-nonsquare"])
def test_weight_tree_matches_param_shapes_and_the_flax_layer(saved, name):
    """The converter's tree, ``param_shapes`` and the linen layer's own init agree leaf for leaf."""
    path = saved(name)
    config = ModelConfig.from_hf(hf_fixtures.hf_config(path))
    state = hf_fixtures.load_hf(path).state_dict()
    converted = weights_from_hf(config, lambda n: state[n].numpy(), np.float32)
    shapes = param_shapes(config, np.float32)
    assert jax.tree.structure(converted) == jax.tree.structure(shapes)
    assert jax.tree.map(np.shape, converted) == jax.tree.map(lambda s: s.shape, shapes)

    x = jax.ShapeDtypeStruct((1, 4, config.hidden_size), np.float32)
    cos = sin = jax.ShapeDtypeStruct((4, config.head_dim), np.float32)
    layer = jax.eval_shape(lambda x, c, s: decoder.DecoderLayer(config).init(
        jax.random.key(0), x, c, s, lambda q, k, v: (q, None)), x, cos, sin)["params"]
    assert jax.tree.map(lambda s: s.shape, layer) == jax.tree.map(lambda s: s.shape[1:], shapes["layers"])
