"""The decoder against a float64 numpy forward pass written from the model definitions (RMSNorm, RoPE
rotate-half, grouped-query attention under a causal or TriangleMix mask recomputed here, SwiGLU),
without torch or transformers, so that it also runs under the newest jax (scripts/test-newest-jax.sh).
The transformers comparisons (tests/test_models_vs_hf.py, tests/test_prefill.py) need torch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tmjax
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes

CONFIGS = {
    "llama": ModelConfig(architecture="llama", vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=12, rms_norm_eps=1e-5, max_position_embeddings=256),
    "qwen3": ModelConfig(architecture="qwen3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256,
                         qk_norm=True, tie_word_embeddings=True),
}


def random_params(config: ModelConfig, seed: int) -> Params:
    """Weights far from transformers' near-uniform init (norm scales N(1, 0.3), the rest N(0, 0.15)),
    so that a misplaced weight or a wrong rotation cannot pass."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config, np.float32))
    leaves = [(rng.normal(1.0, 0.3, spec.shape) if path[-1].key == "scale" else rng.normal(0.0, 0.15, spec.shape)
               ).astype(np.float32) for path, spec in paths]
    return Params(config, jax.tree.unflatten(treedef, leaves))


def _rms(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """``x [T, H, D]`` rotated by position: pairs (i, i + D/2) turn by ``pos * theta ** (-2i / D)``."""
    t, _, d = x.shape
    angle = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # [T, D/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    first, second = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def triangle_mask(t: int, switch: bool, n_init: int, n_local: int, n_last: int) -> np.ndarray:
    """Causal, or TriangleMix's triangle: sinks, a local band and the last rows' full causal rows."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    causal = j <= i
    return causal & ((j < n_init) | (i - j < n_local) | (i >= t - n_last)) if switch else causal


def numpy_logits(params: Params, ids: np.ndarray, layout: tmjax.TriangleMix | None) -> np.ndarray:
    """Next-token logits after ``ids``, in float64."""
    c = params.config
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params.weights)
    lw, t, group = w["layers"], len(ids), c.num_heads // c.num_kv_heads
    x = w["embed_tokens"]["embedding"][ids]
    for layer in range(c.num_layers):
        a = lw["self_attn"]
        h = _rms(x, lw["input_layernorm"]["scale"][layer], c.rms_norm_eps)
        q, k, v = (np.einsum("th,hnd->tnd", h, a[name]["kernel"][layer]) for name in ("q_proj", "k_proj", "v_proj"))
        if c.qk_norm:
            q = _rms(q, a["q_norm"]["scale"][layer], c.rms_norm_eps)
            k = _rms(k, a["k_norm"]["scale"][layer], c.rms_norm_eps)
        q, k = _rope(q, c.rope.theta), _rope(k, c.rope.theta)
        sparse = layout is not None and layer >= layout.switch_layer
        mask = triangle_mask(t, sparse, *(layout.n_init, layout.n_local, layout.n_last) if layout else (0, 0, 0))
        heads = []
        for n in range(c.num_heads):
            s = q[:, n] @ k[:, n // group].T / np.sqrt(c.head_dim)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            heads.append((p / p.sum(axis=-1, keepdims=True)) @ v[:, n // group])
        x = x + np.einsum("tnd,ndh->th", np.stack(heads, axis=1), a["o_proj"]["kernel"][layer])
        h = _rms(x, lw["post_attention_layernorm"]["scale"][layer], c.rms_norm_eps)
        m = lw["mlp"]
        gate, up = h @ m["gate_proj"]["kernel"][layer], h @ m["up_proj"]["kernel"][layer]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ m["down_proj"]["kernel"][layer]
    last = _rms(x[-1], w["norm"]["scale"], c.rms_norm_eps)
    head = w["embed_tokens"]["embedding"].T if c.tie_word_embeddings else w["lm_head"]["kernel"]
    return last @ head


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_the_numpy_forward(name):
    """Dense and TriangleMix (triangles from layer 1, or 0 in a 2-layer model: below the last layer, so
    that the last row's logits see the change), two prompt lengths, a batch of both: every row's logits within float32 rounding of the float64 forward."""
    config = CONFIGS[name]
    params = random_params(config, seed=len(name))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, size=n).astype(np.int32) for n in (150, 37)]
    triangle = tmjax.TriangleMix(1 if config.num_layers > 2 else 0, n_init=4, n_local=16, n_last=8)
    for layout in (None, triangle):
        want = np.stack([numpy_logits(params, ids, layout) for ids in prompts])
        alone = np.stack([np.asarray(tmjax.prefill(params, ids, layout)[0]) for ids in prompts])
        batched = np.asarray(tmjax.prefill(params, prompts, layout)[0])
        scale = np.abs(want).max()
        for got in (alone, batched):
            np.testing.assert_allclose(got, want, atol=2e-4 * scale, rtol=0)
    dense, sparse = (numpy_logits(params, prompts[0], lay) for lay in (None, triangle))
    assert np.abs(dense - sparse).max() > 1e-2 * np.abs(dense).max()  # the layout does change the logits


def test_greedy_generation_follows_the_numpy_forward():
    """``tmjax.generate``'s greedy tokens are the numpy forward's argmax, step by step."""
    config = CONFIGS["llama"]
    params = random_params(config, seed=3)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=20).astype(np.int32)
    got = np.asarray(tmjax.generate(params, ids, 5)).tolist()
    want, seq = [], list(ids)
    for _ in range(5):
        logits = numpy_logits(params, np.asarray(seq), None)
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3 * np.abs(logits).max(), "a near tie: pick another seed"
        want.append(int(np.argmax(logits)))
        seq.append(want[-1])
    assert got == want
