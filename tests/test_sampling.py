"""``tmjax.generate`` with a temperature samples from ``softmax(logits / T)``: sampled frequencies against
the model's own logits, by a chi-square goodness-of-fit test.

One call samples many identical rows at once (rows draw independently). The first token is checked
against ``softmax(prefill logits / T)``; the first two tokens together against
``p(a) * p(b | a)``, with ``p(b | a)`` from ``tmjax.decode_step`` after each possible ``a``, which also
pins that every decode step samples with a fresh key. The vocabulary is small (8) and the weights
large, so the distributions are far from uniform and a wrong temperature moves them a lot.

False-failure rate: for a correct sampler the p-value is uniform on [0, 1], so each check fails by
chance with probability ``ALPHA`` = 1e-3 for a random seed; the seeds are fixed, so the outcome is
deterministic (a change of JAX's PRNG could, with that probability, flag a correct sampler).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats

import tmjax
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes

ALPHA = 1e-3
ROWS = 2000
VOCAB = 8
CONFIG = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def params() -> Params:
    """Weights N(0, 0.5) (norm scales N(1, 0.3)): next-token distributions far from uniform."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(CONFIG))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    drawn = [jax.random.normal(k, s.shape) * (0.3 if path[-1].key == "scale" else 0.5)
             + (1.0 if path[-1].key == "scale" else 0.0) for k, (path, s) in zip(keys, leaves)]
    return Params(CONFIG, jax.tree.unflatten(treedef, drawn))


PROMPT = np.random.default_rng(0).integers(0, VOCAB, size=20).astype(np.int32)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of observed ``counts`` under ``probs``; cells expecting < 5 draws are pooled into one."""
    counts, expected = counts.ravel().astype(np.float64), probs.ravel() * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(scipy.stats.chisquare(counts, expected).pvalue)


def softmax(logits: object, temperature: float) -> np.ndarray:
    return scipy.special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


@pytest.mark.parametrize("temperature, seed", [(0.6, 1), (1.5, 2)])
def test_sample_frequencies_follow_softmax_over_temperature(params, temperature, seed):
    batch = np.tile(PROMPT, (ROWS, 1))
    drawn = np.asarray(tmjax.generate(params, batch, 2, temperature=temperature, key=jax.random.key(seed)))

    logits, _ = tmjax.prefill(params, PROMPT[None], max_new_tokens=1)
    first = softmax(logits[0], temperature)
    assert first.max() > 0.3 and first.min() < 0.05  # far from uniform: the check has power
    counts = np.bincount(drawn[:, 0], minlength=VOCAB)
    assert chi_square_p(counts, first) > ALPHA, (counts, np.round(first * ROWS))

    # p(second | first = a) for every a: one decode step per possible first token
    _, cache = tmjax.prefill(params, np.tile(PROMPT, (VOCAB, 1)), max_new_tokens=1)
    step, _ = tmjax.decode_step(params, np.arange(VOCAB, dtype=np.int32), cache)
    joint = first[:, None] * softmax(step, temperature)
    pairs = np.zeros((VOCAB, VOCAB))
    np.add.at(pairs, (drawn[:, 0], drawn[:, 1]), 1)
    assert chi_square_p(pairs, joint) > ALPHA
