"""The gradient probe: its dL/dP against finite differences through an explicit attention matrix, its
section sums against the reference masks, the switch-layer rule, and ``tmjax probe`` end to end."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_evaluate import TINY_LAYERS, tiny_checkpoint

import hf_fixtures

from tmjax import probe
from tmjax.models import decoder
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes
from tmjax.pallas_kernels import reference

CONFIG = ModelConfig.from_hf(dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
))


def random_params(seed: int = 0) -> Params:
    """Large random weights (norms N(1, 0.3), the rest N(0, 0.3)): logits far from uniform."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(CONFIG))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [jax.random.normal(k, s.shape) * 0.3 + (1.0 if path[-1].key == "scale" else 0.0)
             for k, (path, s) in zip(keys, leaves)]
    return Params(CONFIG, jax.tree.unflatten(treedef, drawn))


def _explicit_attention(q, k, v, delta):
    """Causal softmax attention with the probability matrix materialised and ``delta`` added to it."""
    t, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1) + delta, v, precision="highest")


def test_entry_gradients_match_finite_differences():
    """Loss over two answer tokens (a weighted mean, like ``--all-answer-tokens``)."""
    params = random_params()
    t, n_targets = 24, 2
    tokens = jax.random.randint(jax.random.key(1), (1, t), 0, CONFIG.vocab_size)
    positions = jnp.arange(t - n_targets, t)[None]
    targets = jax.random.randint(jax.random.key(2), (1, n_targets), 0, CONFIG.vocab_size)
    weights = jnp.ones((1, n_targets))
    loss, grad_out, v = jax.jit(probe.attention_output_grads)(params, tokens, jnp.int32(t), positions, targets,
                                                              weights)
    grads = np.stack([np.asarray(probe.entry_gradients(grad_out[l], v[l])[0]) for l in range(CONFIG.num_layers)])

    @jax.jit
    def perturbed_loss(eps, layer, head, row, col):
        delta = jnp.zeros((1, CONFIG.num_heads, t, t)).at[0, head, row, col].set(eps)

        def attention_fn(i, q, k, v, length):
            return _explicit_attention(q, k, v, jnp.where(i == layer, delta, 0.0))

        hidden, _ = decoder.prefill_hidden(params, tokens, t, runs=((0, params.config.num_layers, attention_fn),))
        logp = jax.nn.log_softmax(decoder.logits(params, hidden[0, positions[0]]), axis=-1)
        return -jnp.mean(logp[jnp.arange(n_targets), targets[0]])

    assert float(perturbed_loss(0.0, 0, 0, 0, 0)) == pytest.approx(float(loss), rel=1e-5)
    # The largest causal entries in every layer, and random causal entries.
    rng = np.random.default_rng(0)
    causal = np.tril(np.ones((t, t), bool))
    picks = []
    for layer in range(CONFIG.num_layers):
        flat = np.where(causal[None], np.abs(grads[layer]), -1).ravel()
        picks += [(layer, *map(int, np.unravel_index(i, grads[layer].shape))) for i in np.argsort(flat)[-3:]]
        for _ in range(3):
            row = int(rng.integers(0, t))
            picks.append((layer, int(rng.integers(0, CONFIG.num_heads)), row, int(rng.integers(0, row + 1))))
    eps = 1e-3
    scale = np.abs(grads).max()
    assert scale > 1e-2  # the model is far from uniform: the check below is not vacuous
    for layer, head, row, col in picks:
        fd = (perturbed_loss(eps, layer, head, row, col) - perturbed_loss(-eps, layer, head, row, col)) / (2 * eps)
        assert abs(float(fd) - grads[layer, head, row, col]) <= 2e-3 * scale, (layer, head, row, col)
    # Only the scored positions feed the loss: in the last layer every other row has zero gradient.
    rest = grads[-1, :, :t - n_targets]
    chex.assert_trees_all_equal(rest, np.zeros_like(rest))


@pytest.mark.parametrize("length", [300, 270])
def test_section_sums_match_reference_masks(length):
    t, hq, hkv, d = 300, 4, 2, 8
    n_init, n_local, n_last = 4, 32, 20
    keys = jax.random.split(jax.random.key(3), 2)
    grad_out = jax.random.normal(keys[0], (2, t, hq, d))
    v = jax.random.normal(keys[1], (2, t, hkv, d))
    sums, counts = jax.jit(probe.section_sums, static_argnames=("n_init", "n_local", "n_last"))(
        grad_out, v, length, n_init=n_init, n_local=n_local, n_last=n_last)
    # Independent reference: the full dL/dP in numpy and the masks of tmjax.pallas_kernels.reference.
    g = np.asarray(grad_out, np.float64)[:, :length]
    vv = np.repeat(np.asarray(v, np.float64)[:, :length], hq // hkv, axis=2)
    full = np.abs(np.einsum("bthd,bshd->bhts", g, vv))
    streaming = reference.triangle_mask(length, n_init, n_local, 0)
    triangle = reference.triangle_mask(length, n_init, n_local, n_last)
    masks = (streaming, triangle & ~streaming, reference.causal_mask(length) & ~triangle)
    expected_sums = [float(full[:, :, m].sum()) for m in masks]
    expected_counts = [2 * hq * int(m.sum()) for m in masks]
    assert all(c > 0 for c in expected_counts)
    chex.assert_trees_all_close(np.asarray(sums), np.asarray(expected_sums, np.float32), rtol=1e-4)
    chex.assert_trees_all_equal(np.asarray(counts), np.asarray(expected_counts, np.float32))


@pytest.mark.parametrize(
    "middle, threshold, expected",
    [
        ([1.0, 0.8, 0.5, 0.05, 0.02, 0.01], 0.1, 3),
        ([1.0, 0.8, 0.5, 0.05, 0.02, 0.01], 0.03, 4),
        ([0.2, 1.0, 0.05, 0.5, 0.01, 0.0], 0.1, 4),  # a late bump pushes the switch layer past it
        ([1.0, 0.9, 0.8], 0.1, 3),  # never drops: all dense
        ([0.0, 0.0], 0.1, 0),
        # exact ties (binary fractions): a layer at exactly threshold * peak counts as below ("<=")
        ([2.0, 1.0, 0.25, 0.25], 0.125, 2),
        ([2.0, 0.25, 1.0, 0.25], 0.125, 3),
    ],
)
def test_switch_layer_rule(middle, threshold, expected):
    assert probe.recommend_switch_layer(middle, threshold) == expected


def test_rule_rejects_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        probe.recommend_switch_layer([1.0, 0.1], 1.5)
    with pytest.raises(ValueError, match="finite"):
        probe.recommend_switch_layer([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        probe.probe(random_params(), [])


def test_probe_averages_prompts_and_sees_the_last_layer_structure():
    params = random_params(1)
    rng = np.random.default_rng(4)
    examples = [(rng.integers(0, 64, 40).tolist(), [5, 9]), (rng.integers(0, 64, 33).tolist(), [7])]
    result = probe.probe(params, examples, n_init=2, n_local=8, n_last=6)
    # Per-prompt means recomputed from the full dL/dP and reference masks, then averaged.
    grads_of = jax.jit(probe.attention_output_grads)
    expected = []
    for prompt, answer in examples:
        t = len(prompt)
        _, grad_out, v = grads_of(params, jnp.asarray([prompt]), jnp.int32(t),
                                                      jnp.asarray([[t - 1]]), jnp.asarray([[answer[0]]]),
                                                      jnp.ones((1, 1)))
        streaming = reference.triangle_mask(t, 2, 8, 0)
        triangle = reference.triangle_mask(t, 2, 8, 6)
        masks = (streaming, triangle & ~streaming, reference.causal_mask(t) & ~triangle)
        per_layer = []
        for layer in range(CONFIG.num_layers):
            full = np.abs(np.asarray(probe.entry_gradients(grad_out[layer], v[layer])))
            per_layer.append([full[:, :, m].mean() for m in masks])
        expected.append(per_layer)
    expected = np.mean(expected, axis=0)
    for s, name in enumerate(probe.SECTIONS):
        chex.assert_trees_all_close(getattr(result, name), expected[:, s], rtol=1e-4, atol=1e-9)
    assert result.middle[-1] == 0.0  # first-token loss: no middle row of the last layer matters
    assert result.switch_layer == probe.recommend_switch_layer(result.middle)


def test_probe_loss_on_a_sliding_window_model_matches_transformers(tmp_path):
    """The probe's dense model honours a sliding window exactly (a key is visible iff ``i - j < window``):
    its per-prompt loss (NLL of the answer's first token) equals transformers' on a Mistral with window 8,
    prompts of 40 and 25 tokens."""
    path = hf_fixtures.save_tiny_model(tmp_path, "mistral", sliding_window=8, num_hidden_layers=3)
    params = hf_fixtures.load_tmjax(path)
    rng = np.random.default_rng(5)
    examples = [(rng.integers(0, 256, 40).tolist(), [17]), (rng.integers(0, 256, 25).tolist(), [200, 3])]
    result = probe.probe(params, examples, n_init=2, n_local=4, n_last=4)
    for (prompt, answer), loss in zip(examples, result.losses):
        logits = hf_fixtures.hf_logits(path, np.asarray([prompt]))[0, -1].astype(np.float64)
        expected = -(logits[answer[0]] - logits.max() - np.log(np.sum(np.exp(logits - logits.max()))))
        assert loss == pytest.approx(expected, rel=1e-4)


def test_probe_cli_end_to_end(tmp_path):
    folder = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    code = probe.probe_main(["--checkpoint", str(folder), "--tasks", "niah_single,niah_multivalue",
                             "--samples-per-task", "1", "--max-tokens", "640", "--n-init", "4", "--n-local", "64",
                             "--n-last", "64", "--all-answer-tokens", "--threshold", "0.2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "probe.json").read_text())
    assert (out / "probe.png").stat().st_size > 0
    assert report["num_prompts"] == 2 and report["loss"] == "all answer tokens"
    assert all(len(report["sections"][name]) == TINY_LAYERS for name in probe.SECTIONS)
    assert report["recommended_switch_layer"] == probe.recommend_switch_layer(report["sections"]["middle"], 0.2)
    assert report["rule"] == probe.RULE and report["threshold"] == 0.2
    # Over all answer tokens the last layer's middle rows still get no gradient (the answer rows,
    # at most 37, are within the last 64), but every earlier layer's do.
    assert report["sections"]["middle"][-1] == 0.0
    assert min(report["sections"]["middle"][:-1]) > 0.0
