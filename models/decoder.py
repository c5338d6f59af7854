"""The decoder: Flax linen layers applied over stacked layer weights, for prefill and for decoding.

One ``DecoderLayer`` definition serves every family (the config switches biases, q/k-norm, windows).
In prefill the layers run in ``lax.fori_loop`` over the runs of consecutive layers it is given, each
run with its attention function (``tmjax.plan.layer_runs`` makes them from a layout: dense layers
below the switch layer, Triangle layers at and above it, windowed layers), each iteration indexing
the stacked ``[L, ...]`` weights by the traced layer index: the run boundaries are static, and no
slice of the weight stack is copied out. Keys and values go to a ``KVCache`` for decoding. The
decoder knows no layout and no attention backend: decoding is dense attention over the cache.

Every row of a batch has its own true length: prompts are right-padded, and each row's dense last
rows, RoPE (dynamic RoPE follows the length), cache length and decode position are its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.sharding import Mesh

from tmjax.models import sharding
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params
from tmjax.models.rope import apply_rope, rope_tables

# (layer_index, q, k, v, length) -> out; layer_index is a traced int32 scalar, length int32 [B].
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# Runs of consecutive layers (start, stop) and the attention each runs in prefill.
Runs = Sequence[tuple[int, int, AttentionFn]]
# (q, k, v) -> (out, aux): how a layer attends, and what it hands back to the loop (keys/values).
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


@struct.dataclass
class KVCache:
    """Keys and values (after RoPE) of every layer, ``[L, B, S_max, Hkv, D]``, and how many positions
    of each row are filled, int32 ``[B]``. The head axis is explicit so the cache can be sharded over heads."""

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale (transformers' order)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


class Attention(nn.Module):
    """Projections, q/k-norm and RoPE; the attention itself is the ``attend`` callable."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> tuple[jax.Array, object]:
        c = self.config
        q = nn.DenseGeneral((c.num_heads, c.head_dim), use_bias=c.qkv_bias, name="q_proj")(x)
        k = nn.DenseGeneral((c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias, name="k_proj")(x)
        v = nn.DenseGeneral((c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias, name="v_proj")(x)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        out, aux = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=c.o_bias, name="o_proj")(out), aux


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``. SiLU runs in float32 and is rounded once, like
    transformers' kernel (``x * sigmoid(x)`` in bf16 would round the sigmoid too)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="gate_proj")(x)
        up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="up_proj")(x)
        act = nn.silu(gate.astype(jnp.float32)).astype(gate.dtype)
        return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name="down_proj")(act * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``x += attn(norm(x))``; ``x += mlp(norm(x))``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> tuple[jax.Array, object]:
        c = self.config
        h, aux = Attention(c, name="self_attn")(RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), cos, sin, attend)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, aux


def _rope(config: ModelConfig, positions: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin for ``positions`` (``[T]``, shared by every row, or ``[B, T]``): ``[T, D]`` or
    ``[B, T, D]``. Dynamic RoPE's frequencies follow each row's length ``lengths [B]``, so its tables
    are per row; every other kind is shared and costs no copy per row."""
    if config.rope.kind != "dynamic":
        return rope_tables(config, positions)
    positions = jnp.broadcast_to(positions, lengths.shape + positions.shape[-1:])
    return jax.vmap(lambda p, n: rope_tables(config, p, seq_len=n))(positions, lengths)


def _layer(weights: dict, index: jax.Array) -> dict:
    return jax.tree.map(lambda w: lax.dynamic_index_in_dim(w, index, keepdims=False), weights)


def _embed(params: Params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params.weights["embed_tokens"]["embedding"], tokens, axis=0)


def logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Final norm and LM head on ``hidden [..., H]``; float32 ``[..., V]``."""
    c, w = params.config, params.weights
    x = RMSNorm(c.rms_norm_eps).apply({"params": w["norm"]}, hidden)
    if c.tie_word_embeddings:
        return jnp.einsum("...h,vh->...v", x, w["embed_tokens"]["embedding"], preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", x, w["lm_head"]["kernel"], preferred_element_type=jnp.float32)


def prefill_hidden(
    params: Params,
    tokens: jax.Array,
    length: jax.Array | int,
    *,
    runs: Runs,
    cache_size: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompt ``tokens [B, T]`` (right-padded) through every layer; ``length`` (an int, or
    int32 ``[B]``: one per row) counts each row's real positions.

    ``runs`` covers the layers in order with ``(start, stop, attend)``: layers ``[start, stop)`` call
    ``attend(layer, q, k, v, length)`` (``tmjax.plan.layer_runs``, or one hook over all layers).
    Returns the final hidden states ``[B, T, H]`` (before the final norm) and a cache of
    ``cache_size`` (default T) positions holding the prompt's keys and values. With ``mesh`` (the
    weights' mesh), the cache is sharded by the rules and the attention runs per shard.
    """
    c, w = params.config, params.weights
    batch, seq_len = tokens.shape
    cache_size = seq_len if cache_size is None else cache_size
    if cache_size < seq_len:
        raise ValueError(f"the prompt ({seq_len} positions) is longer than the cache ({cache_size})")
    if [layer for start, stop, _ in runs for layer in range(start, stop)] != list(range(c.num_layers)):
        raise ValueError(f"runs must cover layers 0..{c.num_layers - 1} in order, got {[r[:2] for r in runs]}")
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (batch,))
    x = _embed(params, tokens)
    cos, sin = _rope(c, jnp.arange(seq_len), length)
    shape = (c.num_layers, batch, cache_size, c.num_kv_heads, c.head_dim)
    cache = [jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype)]
    if mesh is not None:
        cache = [jax.lax.with_sharding_constraint(a, sharding.named(sharding.CACHE_AXES, mesh)) for a in cache]
    carry = (x, *cache)
    layer = DecoderLayer(c)

    for start, stop, fn in runs:

        def body(i: jax.Array, carry: tuple, fn: AttentionFn = fn) -> tuple:
            x, cache_k, cache_v = carry
            op = functools.partial(fn, i)
            if mesh is not None:
                op = sharding.shard_attention(op, mesh)

            def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
                return op(q, k, v, length), (k, v)

            x, (k, v) = layer.apply({"params": _layer(w["layers"], i)}, x, cos, sin, attend)
            cache_k = lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (i, 0, 0, 0, 0))
            cache_v = lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (i, 0, 0, 0, 0))
            return x, cache_k, cache_v

        carry = lax.fori_loop(start, stop, body, carry)
    x, cache_k, cache_v = carry
    return x, KVCache(cache_k, cache_v, length)


def _decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, position: jax.Array,
                      window: jax.Array | None) -> jax.Array:
    """One query per sequence, ``q [B, 1, Hq, D]``, against ``k/v [B, S, Hkv, D]``: row ``b`` sees the
    keys at ``<= position[b]`` (and ``> position[b] - window`` where the window is > 0)."""
    batch, _, num_heads, dim = q.shape
    num_kv = k.shape[2]
    qg = q.reshape(batch, num_kv, num_heads // num_kv, dim)
    scores = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) * (dim ** -0.5)
    keys = jnp.arange(k.shape[1])[None, :]
    visible = keys <= position[:, None]  # [B, S]
    if window is not None:
        visible &= (window == 0) | (keys > position[:, None] - window)
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgs,bshd->bhgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, 1, num_heads, dim).astype(q.dtype)


def decode(params: Params, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One step: ``tokens [B]``, row ``b`` at its own position ``cache.length[b]``; dense attention
    over the cache.

    Returns float32 logits ``[B, V]`` and the cache with the step's keys/values written. With
    dynamic RoPE the frequencies follow each row's length so far, as transformers' cached decoding
    does. The caller ensures ``cache.length < cache.max_length``.
    """
    c, w = params.config, params.weights
    position = cache.length
    rows = jnp.arange(position.shape[0])
    x = _embed(params, tokens)[:, None]
    cos, sin = _rope(c, position[:, None], position + 1)
    windows = None
    if c.sliding_window is not None:
        windows = jnp.asarray([c.layer_window(i) or 0 for i in range(c.num_layers)], jnp.int32)
    layer = DecoderLayer(c)

    def body(i: jax.Array, carry: tuple) -> tuple:
        x, cache_k, cache_v = carry

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
            new_k = cache_k.at[i, rows, position].set(k[:, 0].astype(cache_k.dtype))
            new_v = cache_v.at[i, rows, position].set(v[:, 0].astype(cache_v.dtype))
            out = _decode_attention(q, lax.dynamic_index_in_dim(new_k, i, keepdims=False),
                                    lax.dynamic_index_in_dim(new_v, i, keepdims=False), position,
                                    None if windows is None else windows[i])
            return out, (new_k, new_v)

        x, (cache_k, cache_v) = layer.apply({"params": _layer(w["layers"], i)}, x, cos, sin, attend)
        return x, cache_k, cache_v

    x, cache_k, cache_v = lax.fori_loop(0, c.num_layers, body, (x, cache.k, cache.v))
    return logits(params, x[:, 0]), KVCache(cache_k, cache_v, position + 1)

