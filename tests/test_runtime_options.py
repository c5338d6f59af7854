"""Choices made from the platform that the CPU suite never sees by default, reached by pretending to
be on a GPU: the xla fallback for inputs the Pallas kernels do not take, ``TMJAX_PALLAS_INTERPRET``,
and ``decode_step(donate=True)``."""

from __future__ import annotations

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax import attention
from tmjax.models.config import ModelConfig
from tmjax.models.params import init_params
from tmjax.pallas_kernels import reference, tuning


def _spy_on_backends(monkeypatch) -> list[tuple[str, str]]:
    """Record (backend, what) for every call the dispatcher makes into xla and triton: the table an
    ``attend`` runs (``band``, ``causal`` or ``dynamic``) or ``last_rows``. A call traced once per
    branch of the value guard's ``lax.cond`` (xla's ``guard="nonfinite"``) is recorded each time:
    compare ``_distinct(calls)``."""
    calls = []
    for name in ("xla", "triton"):
        module = importlib.import_module(f"tmjax.pallas_kernels.{name}")

        def attend(q, k, v, table, *args, _real=module.attend, _name=name):
            kind = "dynamic" if table.dynamic else ("causal" if table.n_local is None else "band")
            calls.append((_name, kind))
            return _real(q, k, v, table, *args)

        def last_rows(*args, _real=module.last_rows, _name=name):
            calls.append((_name, "last_rows"))
            return _real(*args)

        monkeypatch.setattr(module, "attend", attend)
        monkeypatch.setattr(module, "last_rows", last_rows)
    return calls


def _distinct(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The recorded calls in first-seen order, each once."""
    return list(dict.fromkeys(calls))


@pytest.mark.parametrize(
    "dtype, head_dim, expected",
    [(jnp.float32, 64, "xla"), (jnp.bfloat16, 32, "xla"), (jnp.bfloat16, 64, "triton")],
    ids=["float32", "head_dim-32", "bf16-64"],
)
def test_platform_default_falls_back_to_xla_for_inputs_the_kernels_do_not_take(monkeypatch, dtype, head_dim,
                                                                               expected):
    """With a Pallas kernel as the platform default (Triton, as on a pre-Hopper GPU; it runs in the
    interpreter here), ``implementation=None`` sends float32 inputs and head dims other than 64/128
    to xla and the rest to the kernel; either way the result is the masked dense reference."""
    monkeypatch.setattr(attention, "default_implementation", lambda: "triton")
    calls = _spy_on_backends(monkeypatch)
    t, sizes = 64, dict(n_init=4, n_local=16, n_last=8)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, t, 4, head_dim)).astype(dtype)
    k, v = (jax.random.normal(key, (1, t, 2, head_dim)).astype(dtype) for key in keys[1:])
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    out = tmjax.triangle_attention(q, k, v, **sizes)
    want = reference.masked_attention(q, k, v, reference.triangle_mask(t, sizes["n_init"], sizes["n_local"],
                                                                       sizes["n_last"]))
    chex.assert_trees_all_close(out.astype(jnp.float32), want.astype(jnp.float32), atol=tolerance)
    out = tmjax.causal_attention(q, k, v)
    want = reference.masked_attention(q, k, v, reference.causal_mask(t))
    chex.assert_trees_all_close(out.astype(jnp.float32), want.astype(jnp.float32), atol=tolerance)
    assert _distinct(calls) == [(expected, "band"), (expected, "last_rows"), (expected, "causal")]


@pytest.mark.parametrize("platform_default, expected", [("triton", "triton"), ("tpu", "xla")])
def test_vertical_slash_default_runs_the_kernels_validated_on_hardware(monkeypatch, platform_default, expected):
    """``implementation=None`` runs vertical-slash through the platform's kernel where it has passed the
    GPU grid (triton, mosaic_gpu) and through xla on a TPU, whose kernel has only been interpreted;
    either way the result is the dense reference under the recomputed vertical-slash mask."""
    monkeypatch.setattr(attention, "default_implementation", lambda: platform_default)
    calls = _spy_on_backends(monkeypatch)
    t = 128
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, t, 4, 64)).astype(jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, t, 2, 64)).astype(jnp.bfloat16) for key in keys[1:])
    pattern = tmjax.VerticalSlash(vertical=8, slash=16, last_q=16, force_vertical=2, force_slash=4, guard=False)
    out = attention.vertical_slash(q, k, v, pattern)
    columns, diagonals = tmjax.vertical_slash_indices(q, k, vertical=8, slash=16, last_q=16, force_vertical=2,
                                                      force_slash=4)
    columns, diagonals = np.asarray(columns), np.asarray(diagonals)
    per_head = [reference.vertical_slash_mask(t, t, columns[0, h], diagonals[0, h]) for h in range(columns.shape[1])]
    mask = np.repeat(np.stack(per_head), 4 // columns.shape[1], axis=0)[None]
    want = reference.masked_attention(q, k, v, mask)
    chex.assert_trees_all_close(out.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)
    assert _distinct(calls) == [(expected, "dynamic")]


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_interpret_environment_variable(monkeypatch, backend):
    """On a GPU or TPU the Pallas kernels compile unless ``TMJAX_PALLAS_INTERPRET`` is set to something
    other than ``0``; on CPU they always interpret. Seen through the tuning each mode reads from the
    table: the interpreter's entry (``interpret``, small blocks) or the device's."""
    module = importlib.import_module(f"tmjax.pallas_kernels.{backend}")

    def chosen():
        found = tuning.choose(module, backend, q_heads=8, kv_heads=2, head_dim=64, pattern="triangle")
        return found.interpret, module.block_sizes(8, 2, found)

    monkeypatch.delenv("TMJAX_PALLAS_INTERPRET", raising=False)
    on_cpu, here = jax.default_backend() == "cpu", chosen()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    compiled = chosen()
    monkeypatch.setenv("TMJAX_PALLAS_INTERPRET", "1")
    interpreted = chosen()
    assert interpreted[0] and not compiled[0] and compiled[1] != interpreted[1]
    if on_cpu:
        assert here == interpreted
    for value, expected in (("", compiled), ("0", compiled), ("1", interpreted)):
        monkeypatch.setenv("TMJAX_PALLAS_INTERPRET", value)
        assert chosen() == expected, value


def test_decode_step_with_donation_consumes_the_cache_and_nothing_else(monkeypatch):
    """``donate=True`` where donation is used (pretending to be a GPU; XLA's CPU client honours
    donation too): the same logits and cache as ``donate=False``, the cache passed in is consumed,
    the weights and the token are not."""
    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(config, jax.random.key(0))
    prompt = np.arange(10, dtype=np.int32)[None] % 64
    token = jnp.asarray([5], jnp.int32)
    _, cache = tmjax.prefill(params, prompt, max_new_tokens=4)
    want_logits, want_cache = tmjax.decode_step(params, token, cache)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    _, cache = tmjax.prefill(params, prompt, max_new_tokens=4)
    logits, new_cache = tmjax.decode_step(params, token, cache, donate=True)
    chex.assert_trees_all_close((logits, new_cache.k, new_cache.v), (want_logits, want_cache.k, want_cache.v))
    assert new_cache.length.tolist() == want_cache.length.tolist() == [11]
    assert cache.k.is_deleted() and cache.v.is_deleted()
    assert not token.is_deleted() and not any(w.is_deleted() for w in jax.tree.leaves(params.weights))
