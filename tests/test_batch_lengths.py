"""Prompts of different lengths in one batch: every row's logits, cache, decoding and greedy tokens
equal that prompt run alone, checked against dense float32 attention with the row's own explicit mask
(and, for dynamic RoPE, against transformers' cached decoding of the row alone)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures
from tmjax import api, plan
from tmjax.layout import TriangleMix, VerticalSlash
from tmjax.models.config import ModelConfig
from tmjax.models.params import init_params
from tmjax.pallas_kernels.reference import causal_mask, masked_attention, triangle_mask
from test_prefill import LAYOUT, MODELS

ONE_BUCKET = (5, 28, 17)        # all pad to 128
ACROSS_BUCKETS = (28, 140, 60)  # the longest pads to 256: the short rows carry 200+ padding positions
STEPS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (saved folder, our Params) of test_prefill's tiny models; the dynamic-RoPE one's
    frequencies follow each row's own length (28 and 60 > 16 positions)."""
    return hf_fixtures.tiny_models(tmp_path_factory, MODELS)


def _prompts(seed: int, lengths: tuple[int, ...], extra: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n + extra, dtype=np.int32) for n in lengths]


def _reference_logits(params, tokens: np.ndarray, prompt_len: int, layout: TriangleMix | None) -> np.ndarray:
    """Logits ``[T, V]`` of one unpadded sequence: dense float32 attention with an explicit mask, the
    triangle of the prompt's length on the prompt rows of Triangle layers, causal everywhere else."""
    n = tokens.shape[0]
    triangle = causal_mask(n)
    if layout is not None:
        triangle[:prompt_len, :prompt_len] = triangle_mask(prompt_len, layout.n_init, layout.n_local, layout.n_last)
    switch = params.config.num_layers if layout is None else layout.switch_layer

    def attend(layer, q, k, v, length):
        return jnp.where(layer >= switch, masked_attention(q, k, v, triangle), masked_attention(q, k, v, causal_mask(n)))

    return np.asarray(_full_logits(params, tokens[None], attention_fn=attend)[0])


_full_logits = jax.jit(plan.full_logits, static_argnames=("attention_fn",))


@pytest.mark.parametrize("name, lengths, layout", [
    ("llama", ONE_BUCKET, None), ("llama", ONE_BUCKET, LAYOUT), ("llama", ACROSS_BUCKETS, None),
    ("llama", ACROSS_BUCKETS, LAYOUT), ("qwen3", ACROSS_BUCKETS, LAYOUT), ("dynamic", ACROSS_BUCKETS, None),
], ids=["llama-one-bucket-dense", "llama-one-bucket-trianglemix", "llama-across-dense", "llama-across-trianglemix",
        "qwen3-across-trianglemix", "dynamic-rope-across-dense"])
def test_every_row_equals_its_reference_through_decode(models, name, lengths, layout):
    path, params = models(name)
    sequences = _prompts(len(lengths), lengths, extra=STEPS)
    logits, cache = api.prefill(params, [s[:n] for s, n in zip(sequences, lengths)], layout)
    assert cache.length.tolist() == list(lengths) and cache.max_length >= api.bucket_length(max(lengths)) + 256
    steps = [np.asarray(logits)]
    for t in range(STEPS):  # each row continues at its own position
        logits, cache = api.decode_step(params, np.asarray([s[n + t] for s, n in zip(sequences, lengths)]), cache)
        steps.append(np.asarray(logits))
    assert cache.length.tolist() == [n + STEPS for n in lengths]
    ours = np.stack(steps, axis=1)  # [B, STEPS + 1, V]
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        if name == "dynamic":  # the base grows with each row's length, step by step, as transformers' cache does
            reference, tol = hf_fixtures.hf_cached_logits(path, seq[None], n)[0], 1e-4
        else:
            reference, tol = _reference_logits(params, seq, n, layout)[n - 1:], 1e-5
        hf_fixtures.assert_close_to_scale(ours[row], reference, tol=tol)


@pytest.mark.parametrize("layout", [None, LAYOUT], ids=["dense", "trianglemix"])
def test_greedy_tokens_of_a_batch_equal_each_prompt_alone(models, layout):
    _, params = models("qwen3")
    prompts = _prompts(7, ACROSS_BUCKETS)
    batch = np.asarray(api.generate(params, prompts, 5, layout))
    for row, prompt in zip(batch, prompts):
        np.testing.assert_array_equal(row, api.generate(params, prompt, 5, layout))
    # the same batch as [B, T] tokens with lengths; what lies past a row's length (here -1) is ignored
    width = max(ACROSS_BUCKETS)
    padded = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, :prompt.size] = prompt
    np.testing.assert_array_equal(api.generate(params, padded, 5, layout, lengths=list(ACROSS_BUCKETS)), batch)
    # prefill, then generate_from: the same tokens, prefill timed apart
    logits, cache = api.prefill(params, prompts, layout, max_new_tokens=5)
    np.testing.assert_array_equal(api.generate_from(params, logits, cache, 5), batch)


@pytest.mark.parametrize("implementation", ["xla", "triton", "tpu"])
def test_rows_equal_their_prompt_alone_on_each_backend(implementation):
    """The Pallas kernels (interpreted on CPU) take per-row starts for the dense last rows: a bf16
    model (head_dim 64, what they take) gives each row the logits and greedy tokens of its prompt alone."""
    config = ModelConfig(architecture="llama", vocab_size=128, hidden_size=128, intermediate_size=128, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=64)
    params = init_params(config, jax.random.key(1), jnp.bfloat16)
    params = type(params)(config, jax.tree.map(lambda w: w * 5 if w.ndim > 1 else w, params.weights))
    prompts = [p % 128 for p in _prompts(8, (70, 40))]  # row 1 is longer than sinks + window
    layout = TriangleMix(switch_layer=1, n_init=4, n_local=16, n_last=8)
    logits, _ = api.prefill(params, prompts, layout, implementation=implementation, max_new_tokens=4)
    batch = np.asarray(api.generate(params, prompts, 4, layout, implementation=implementation))
    for row, prompt in enumerate(prompts):
        alone, _ = api.prefill(params, prompt, layout, implementation=implementation, max_new_tokens=4)
        hf_fixtures.assert_close_to_scale(logits[row], alone, tol=1e-5)
        np.testing.assert_array_equal(batch[row], api.generate(params, prompt, 4, layout, implementation=implementation))


def test_vertical_slash_rows_equal_their_prompt_alone(models):
    """Vertical-slash estimates its pattern from each row's own last queries: in a batch padded to
    640, every row gets the logits and greedy tokens of its prompt alone (padded to its own bucket)."""
    _, params = models("llama")
    pattern = VerticalSlash(vertical=8, slash=2, last_q=64, force_vertical=2, force_slash=1, guard=False)
    layout = TriangleMix(switch_layer=2, n_init=4, n_local=32, n_last=16, shallow=pattern)
    prompts = _prompts(9, (600, 400, 250))
    logits, _ = api.prefill(params, prompts, layout, max_new_tokens=4)
    batch = np.asarray(api.generate(params, prompts, 4, layout))
    dense, _ = api.prefill(params, prompts, max_new_tokens=4)
    for row, prompt in enumerate(prompts):
        alone, _ = api.prefill(params, prompt, layout, max_new_tokens=4)
        hf_fixtures.assert_close_to_scale(logits[row], alone, tol=1e-5)
        np.testing.assert_array_equal(batch[row], api.generate(params, prompt, 4, layout))
        # the pattern matters at these lengths, so a row run with another row's pattern would differ
        assert np.max(np.abs(np.asarray(dense[row] - alone))) > 1e-2 * np.max(np.abs(np.asarray(alone)))
