"""Sharding over a device mesh, on 8 virtual CPU devices: meshes 1x8, 2x4 and 8x1 (data x model) give
the single-device logits and greedy tokens (Llama, Qwen3, Mistral; dense, TriangleMix and
vertical-slash), and the weights and the cache really are split (``.sharding``, per-device shapes).

The rest of the suite keeps one device, so ``test_on_8_virtual_cpu_devices`` runs this file again in
a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; there the other tests run.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_fixtures
from tmjax import api, plan
from tmjax.checkpoint import load
from tmjax.convert import cli as convert_cli
from tmjax.layout import TriangleMix, VerticalSlash
from tmjax.models import decoder, sharding

DEVICES = 8
ON_MESH = jax.device_count() >= DEVICES
needs_devices = pytest.mark.skipif(not ON_MESH, reason="runs in the 8-device subprocess")

MESHES = [(1, 8), (2, 4), (8, 1)]
LAYOUT = TriangleMix(switch_layer=1, n_init=2, n_local=4, n_last=3)
# 16 query heads and 8 KV heads: the model axis may be 1, 4 or 8
HEADS = dict(num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=8, head_dim=16)
FAMILIES = {"llama": ("llama", {}), "qwen3": ("qwen3", {}), "mistral": ("mistral", dict(sliding_window=100))}
LENGTHS = (5, 28, 17, 60, 33, 12, 44, 9)  # 8 rows of different lengths (the window of 100 hides nothing)
NEW_TOKENS = 4


def test_on_8_virtual_cpu_devices():
    if ON_MESH:
        pytest.skip("already in the 8-device subprocess")
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" in result.stdout  # the launcher skipped itself there


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (saved HF folder, our Params on one device)"""
    return hf_fixtures.tiny_models(tmp_path_factory, {name: (family, {**HEADS, **extra})
                                                      for name, (family, extra) in FAMILIES.items()})


@functools.cache
def _mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, (sharding.DATA, sharding.MODEL))


def _prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=n, dtype=np.int32) for n in LENGTHS]


def _assert_split(array: jax.Array, spec: P, shard_shape: tuple[int, ...]) -> None:
    """``array`` is laid out as ``spec`` says (XLA may drop axes of size 1 from its own spec) and every
    device holds a block of ``shard_shape``."""
    expected = jax.sharding.NamedSharding(array.sharding.mesh, spec)
    assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding.spec, spec)
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}
    assert len(array.addressable_shards) == DEVICES


@needs_devices
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mesh_gives_the_single_device_logits_and_tokens(models, name, shape):
    _, params = models(name)
    config = params.config
    data, model = shape
    sharded = sharding.shard_params(params, _mesh(shape))
    attn = sharded.weights["layers"]["self_attn"]
    L, H, D = config.num_layers, config.hidden_size, config.head_dim
    _assert_split(attn["q_proj"]["kernel"], P(None, None, "model", None), (L, H, config.num_heads // model, D))
    _assert_split(attn["k_proj"]["kernel"], P(None, None, "model", None), (L, H, config.num_kv_heads // model, D))
    _assert_split(attn["o_proj"]["kernel"], P(None, "model", None, None), (L, config.num_heads // model, D, H))
    _assert_split(sharded.weights["layers"]["mlp"]["down_proj"]["kernel"], P(None, "model", None),
                  (L, config.intermediate_size // model, H))
    prompts = _prompts()
    for layout in (LAYOUT, None):
        reference, reference_cache = api.prefill(params, prompts, layout)
        logits, cache = api.prefill(sharded, prompts, layout)
        hf_fixtures.assert_close_to_scale(logits, reference, tol=1e-5)
        _assert_split(cache.k, P(None, "data", None, "model", None),
                      (L, len(LENGTHS) // data, cache.max_length, config.num_kv_heads // model, D))
        assert cache.length.tolist() == list(LENGTHS)
    np.testing.assert_array_equal(api.generate(sharded, prompts, NEW_TOKENS, LAYOUT),
                                  api.generate(params, prompts, NEW_TOKENS, LAYOUT))
    # decoding after the dense prefill (generate covered decoding after the TriangleMix one)
    token = np.argmax(np.asarray(reference), axis=-1).astype(np.int32)
    stepped, cache = api.decode_step(sharded, token, cache)
    hf_fixtures.assert_close_to_scale(stepped, api.decode_step(params, token, reference_cache)[0], tol=1e-5)
    assert cache.k.sharding.is_equivalent_to(jax.sharding.NamedSharding(cache.k.sharding.mesh,
                                                                        P(None, "data", None, "model", None)), 5)


@needs_devices
def test_attention_runs_per_shard(models):
    """Each run of alike layers calls its attention inside one shard_map (a manual computation in the
    lowered program); XLA's partitioner alone would give the same numbers, maybe gathering heads."""
    _, params = models("llama")
    mesh = sharding.params_mesh(sharding.shard_params(params, _mesh((2, 4))))
    prefill = jax.jit(decoder.prefill_hidden, static_argnames=("runs", "mesh"))
    tokens, lengths = np.zeros((2, 128), np.int32), np.asarray([5, 90], np.int32)
    for layout, runs in ((None, 1), (LAYOUT, 2)):  # dense: one run of 3 layers; TriangleMix: layer 0, layers 1-2
        text = prefill.lower(params, tokens, lengths, runs=plan.layer_runs(params.config, layout, 128), mesh=mesh).as_text()
        assert text.count("sdy.manual_computation(") == runs


@needs_devices
def test_vertical_slash_per_shard(models):
    """Vertical-slash selects per KV group, and a group's query heads stay on its KV head's device:
    a 2x4 mesh gives the single-device logits and tokens of TriangleMix(shallow=VerticalSlash)."""
    _, params = models("llama")
    pattern = VerticalSlash(vertical=8, slash=2, last_q=64, force_vertical=2, force_slash=1, guard=False)
    layout = TriangleMix(switch_layer=2, n_init=4, n_local=32, n_last=16, shallow=pattern)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, size=n, dtype=np.int32) for n in (600, 250)]
    sharded = sharding.shard_params(params, _mesh((2, 4)))
    hf_fixtures.assert_close_to_scale(api.prefill(sharded, prompts, layout)[0], api.prefill(params, prompts, layout)[0],
                                      tol=1e-5)
    np.testing.assert_array_equal(api.generate(sharded, prompts, NEW_TOKENS, layout),
                                  api.generate(params, prompts, NEW_TOKENS, layout))


@needs_devices
def test_load_restores_into_shards(models, tmp_path):
    path, params = models("qwen3")
    ckpt = tmp_path / "ckpt"
    assert convert_cli.main([str(path), str(ckpt), "--dtype", "float32", "--quiet"]) == 0
    whole = load(ckpt)
    sharded = load(ckpt, mesh=_mesh((2, 4)))
    for (key, full), part in zip(jax.tree_util.tree_flatten_with_path(whole.weights)[0],
                                 jax.tree.leaves(sharded.weights)):
        assert part.shape == full.shape and part.sharding.mesh.shape == {"data": 2, "model": 4}, key
        for shard in part.addressable_shards:  # every device holds its own slice of the weight, no more
            np.testing.assert_array_equal(shard.data, np.asarray(full)[shard.index])
    qk = sharded.weights["layers"]["self_attn"]["q_proj"]["kernel"]
    assert qk.addressable_shards[0].data.shape[2] == params.config.num_heads // 4


@needs_devices
def test_a_batch_that_does_not_split_over_data(models):
    _, params = models("llama")
    sharded = sharding.shard_params(params, _mesh((2, 4)))
    prompts = _prompts()[:3]
    with pytest.raises(ValueError, match="batch of 3 rows does not split over the mesh's 'data' axis"):
        api.prefill(sharded, prompts)
    # generate pads the batch to a multiple of the data axis and drops the padding rows
    np.testing.assert_array_equal(api.generate(sharded, prompts, NEW_TOKENS), api.generate(params, prompts, NEW_TOKENS))


@needs_devices
def test_meshes_that_do_not_fit_the_model_are_refused(models):
    _, params = models("llama")
    few_kv = params.config.__class__(**{**params.config.__dict__, "num_kv_heads": 2, "num_heads": 16})
    with pytest.raises(ValueError, match=r"'model' axis \(8 devices\) must divide num_kv_heads \(2\).*not replicated"):
        sharding.param_shardings(few_kv, _mesh((1, 8)))
    with pytest.raises(ValueError, match="mesh axes must be named"):
        sharding.param_shardings(params.config, jax.make_mesh((2, 4), ("batch", "tensor")))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sharding.param_shardings(params.config, "1x8")


# Every weight's mesh axes on a (data, model) mesh, written out by hand from the rule table's meaning
# (heads, the MLP hidden size and the vocabulary over "model"; nothing over "data"; layers, hidden size
# and head_dim replicated), independent of sharding.RULES and params.weight_specs.
EXPECTED_SPECS = {
    "embed_tokens/embedding": P("model", None),
    "lm_head/kernel": P(None, "model"),
    "norm/scale": P(None),
    "layers/input_layernorm/scale": P(None, None),
    "layers/post_attention_layernorm/scale": P(None, None),
    "layers/self_attn/q_proj/kernel": P(None, None, "model", None),
    "layers/self_attn/k_proj/kernel": P(None, None, "model", None),
    "layers/self_attn/v_proj/kernel": P(None, None, "model", None),
    "layers/self_attn/o_proj/kernel": P(None, "model", None, None),
    "layers/self_attn/q_norm/scale": P(None, None),
    "layers/self_attn/k_norm/scale": P(None, None),
    "layers/mlp/gate_proj/kernel": P(None, None, "model"),
    "layers/mlp/up_proj/kernel": P(None, None, "model"),
    "layers/mlp/down_proj/kernel": P(None, "model", None),
}


@needs_devices
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_every_weight_and_the_cache_follow_the_rule_table(models, name):
    """Each weight's ``.sharding`` (and the cache's) against the hand-written table above on a 2x4 mesh:
    a vocabulary axis put on ``data`` keeps the logits equal, so only the placement shows it."""
    _, params = models(name)
    sharded = sharding.shard_params(params, _mesh((2, 4)))
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.weights)[0]:
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        assert key in EXPECTED_SPECS, key
        expected = jax.sharding.NamedSharding(leaf.sharding.mesh, EXPECTED_SPECS[key])
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (key, leaf.sharding.spec, EXPECTED_SPECS[key])
        seen.add(key)
    assert "lm_head/kernel" in seen and "embed_tokens/embedding" in seen
    _, cache = api.prefill(sharded, _prompts(), None)
    for array in (cache.k, cache.v):
        expected = jax.sharding.NamedSharding(array.sharding.mesh, P(None, "data", None, "model", None))
        assert array.sharding.is_equivalent_to(expected, array.ndim), array.sharding.spec
