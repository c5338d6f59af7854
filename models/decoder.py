"""The decoder: Flax linen layers applied over stacked layer weights, for prefill and for decoding.

One ``DecoderLayer`` definition serves every family (the config switches biases, q/k-norm, windows).
In prefill the layers run in ``lax.fori_loop`` over the runs of consecutive layers it is given, each
run with its attention function (``tmjax.plan.layer_runs`` makes them from a layout: dense layers
below the switch layer, Triangle layers at and above it, windowed layers), each iteration indexing
the stacked ``[L, ...]`` weights by the traced layer index: the run boundaries are static, and no
slice of the weight stack is copied out. Inside a layer the per-token parts (norms, projections,
RoPE, MLP) run over chunks of tokens and only the attention sees the whole sequence, so a long
prompt's activations stay bounded (``prefill_hidden``). Keys and values go to a ``KVCache`` for
decoding (optionally one byte per number, fp8 or int8, ``kv_quant``). The decoder knows no layout and no attention backend:
decoding is dense attention over the cache.

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

from tmjax.models import kv_quant, sharding
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
    of each row are filled, int32 ``[B]``. The head axis is explicit so the cache can be sharded over heads.
    A one-byte cache (fp8 or int8, ``kv_quant``) holds float32 scales ``[L, B, S_max, Hkv]`` beside them,
    a ring ``recent_k/recent_v [L, B, W, Hkv, D]`` (W = ``min(kv_quant.RECENT, S_max)``) holding each row's
    last W real positions exact, position ``p`` in slot ``p % W``, and sinks ``sink_k/sink_v [L, B, N, Hkv, D]``
    (N = ``min(kv_quant.SINKS, S_max)``) holding each row's first N real positions exact, position ``p`` in
    slot ``p`` (zeros past a shorter row's length); ring and sinks in the activations' dtype, all None otherwise."""

    k: jax.Array
    v: jax.Array
    length: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    recent_k: jax.Array | None = None
    recent_v: jax.Array | None = None
    sink_k: jax.Array | None = None
    sink_v: jax.Array | None = None

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, size: int, dtype: object, mesh: Mesh | None = None,
              exact_dtype: object = jnp.float32) -> KVCache:
        """A zero cache of ``size`` positions in ``dtype`` (fp8, int8: with unit scales, and a ring of the recent
        positions and the sinks in ``exact_dtype``), sharded on ``mesh``."""
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        arrays = [jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)]
        axes = [sharding.CACHE_AXES] * 2
        if kv_quant.quantized(dtype):
            ring, sinks = ((*shape[:2], min(n, size), *shape[3:]) for n in (kv_quant.RECENT, kv_quant.SINKS))
            arrays += [jnp.ones(shape[:-1], jnp.float32)] * 2 + [jnp.zeros(ring, exact_dtype)] * 2
            arrays += [jnp.zeros(sinks, exact_dtype)] * 2
            axes += [sharding.CACHE_AXES[:-1]] * 2 + [sharding.CACHE_AXES] * 4
        if mesh is not None:
            arrays = [lax.with_sharding_constraint(a, sharding.named(ax, mesh)) for a, ax in zip(arrays, axes)]
        extra = dict(zip(("k_scale", "v_scale", "recent_k", "recent_v", "sink_k", "sink_v"), arrays[2:]))
        return cls(arrays[0], arrays[1], jnp.zeros((batch,), jnp.int32), **extra)

    def put(self, layer: jax.Array, start: jax.Array | int, k: jax.Array, v: jax.Array, length: jax.Array) -> KVCache:
        """Write ``k, v [B, n, Hkv, D]`` at positions ``[start, start + n)`` of ``layer`` (every row);
        ``length [B]``: each row's real positions (a one-byte cache's ring and sinks take no padding)."""
        if self.k_scale is None:
            return self.replace(k=lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), (layer, 0, start, 0, 0)),
                                v=lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), (layer, 0, start, 0, 0)))
        (k8, ks), (v8, vs) = kv_quant.quantize(k, self.k.dtype), kv_quant.quantize(v, self.v.dtype)
        # the ring takes this chunk's last W real positions of each row: distinct slots in one scatter, and
        # later chunks (an overlapping last chunk too) hold the newer positions
        ring = self.recent_k.shape[2]
        positions = start + jnp.arange(k.shape[1])[None, :]
        last = jnp.minimum(start + k.shape[1], length)[:, None] - 1
        slots = jnp.where((positions <= last) & (positions > last - ring), positions % ring, ring)  # ring: dropped
        rows = jnp.broadcast_to(jnp.arange(k.shape[0])[:, None], slots.shape)
        # the sinks take each row's real positions < N, in slot p (padding goes to slot N, and N and past: dropped)
        sinks = jnp.where(positions < length[:, None], positions, self.sink_k.shape[2])
        return self.replace(k=lax.dynamic_update_slice(self.k, k8[None], (layer, 0, start, 0, 0)),
                            v=lax.dynamic_update_slice(self.v, v8[None], (layer, 0, start, 0, 0)),
                            k_scale=lax.dynamic_update_slice(self.k_scale, ks[None], (layer, 0, start, 0)),
                            v_scale=lax.dynamic_update_slice(self.v_scale, vs[None], (layer, 0, start, 0)),
                            recent_k=self.recent_k.at[layer, rows, slots].set(k.astype(self.recent_k.dtype), mode="drop"),
                            recent_v=self.recent_v.at[layer, rows, slots].set(v.astype(self.recent_v.dtype), mode="drop"),
                            sink_k=self.sink_k.at[layer, rows, sinks].set(k.astype(self.sink_k.dtype), mode="drop"),
                            sink_v=self.sink_v.at[layer, rows, sinks].set(v.astype(self.sink_v.dtype), mode="drop"))

    def put_rows(self, layer: jax.Array, rows: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array
                 ) -> KVCache:
        """Write one step ``k, v [B, Hkv, D]``, row ``b`` at its own position ``positions[b]`` (a one-byte
        cache: also in the ring, and in the sinks where ``positions[b] < N``)."""
        if self.k_scale is None:
            return self.replace(k=self.k.at[layer, rows, positions].set(k.astype(self.k.dtype)),
                                v=self.v.at[layer, rows, positions].set(v.astype(self.v.dtype)))
        (k8, ks), (v8, vs) = kv_quant.quantize(k, self.k.dtype), kv_quant.quantize(v, self.v.dtype)
        slots = positions % self.recent_k.shape[2]
        # the sinks take positions < N: the others fall outside them and are dropped
        return self.replace(k=self.k.at[layer, rows, positions].set(k8), v=self.v.at[layer, rows, positions].set(v8),
                            k_scale=self.k_scale.at[layer, rows, positions].set(ks),
                            v_scale=self.v_scale.at[layer, rows, positions].set(vs),
                            recent_k=self.recent_k.at[layer, rows, slots].set(k.astype(self.recent_k.dtype)),
                            recent_v=self.recent_v.at[layer, rows, slots].set(v.astype(self.recent_v.dtype)),
                            sink_k=self.sink_k.at[layer, rows, positions].set(k.astype(self.sink_k.dtype), mode="drop"),
                            sink_v=self.sink_v.at[layer, rows, positions].set(v.astype(self.sink_v.dtype), mode="drop"))

    def layer(self, index: jax.Array) -> tuple[jax.Array | None, ...]:
        """Layer ``index``'s ``(k, v [B, S, Hkv, D], k_scale, v_scale [B, S, Hkv], recent_k, recent_v
        [B, W, Hkv, D], sink_k, sink_v [B, N, Hkv, D])``, the last six None unless the cache is one-byte."""
        pick = functools.partial(lax.dynamic_index_in_dim, index=index, keepdims=False)
        extra = (self.k_scale, self.v_scale, self.recent_k, self.recent_v, self.sink_k, self.sink_v)
        return pick(self.k), pick(self.v), *(None if a is None else pick(a) for a in extra)


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
    """Projections, q/k-norm and RoPE (``qkv``) and the output projection (``out``); the attention
    itself is the caller's, so that prefill can run the per-token parts over chunks of tokens."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.q_proj = nn.DenseGeneral((c.num_heads, c.head_dim), use_bias=c.qkv_bias)
        self.k_proj = nn.DenseGeneral((c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias)
        self.v_proj = nn.DenseGeneral((c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias)
        self.o_proj = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps)
            self.k_norm = RMSNorm(c.rms_norm_eps)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attended: jax.Array) -> jax.Array:
        return self.o_proj(attended)


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
    """Pre-norm residual block: ``x += attn(norm(x))``; ``x += mlp(norm(x))``, in two per-token
    stages around the attention: ``qkv`` (norm, projections, RoPE) and ``finish`` (output projection,
    residual, MLP). ``__call__`` runs both with ``attend`` between them."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps)
        self.mlp = MLP(c)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def finish(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        x = x + self.self_attn.out(attended)
        return x + self.mlp(self.post_attention_layernorm(x))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> tuple[jax.Array, object]:
        attended, aux = attend(*self.qkv(x, cos, sin))
        return self.finish(x, attended), aux


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


def _over_chunks(step: Callable[[object, jax.Array, jax.Array], object], carry: object, seq_len: int,
                 chunk: int) -> object:
    """``carry = step(carry, start, fresh)`` over chunks ``[start, start + chunk)`` covering ``seq_len``
    positions, in one ``fori_loop``. Every step has the same static size, so every chunk runs the same
    compiled code (a smaller last chunk could get other kernels, and results an ulp apart): when
    ``chunk`` does not divide ``seq_len`` the last chunk ends at ``seq_len`` and overlaps the one before;
    ``fresh`` (bool ``[chunk]``) marks its rows that no earlier step covered."""
    def body(j: jax.Array, carry: object) -> object:
        start = jnp.minimum(j * chunk, seq_len - chunk)
        return step(carry, start, start + jnp.arange(chunk) >= j * chunk)

    return lax.fori_loop(0, -(-seq_len // chunk), body, carry)


def _slice(x: jax.Array, start: jax.Array, size: int, axis: int = 1) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _put(buffer: jax.Array, value: jax.Array, start: jax.Array, axis: int = 1) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(buffer, value.astype(buffer.dtype), start, axis=axis)


def prefill_hidden(
    params: Params,
    tokens: jax.Array,
    length: jax.Array | int,
    *,
    runs: Runs,
    cache_size: int | None = None,
    mesh: Mesh | None = None,
    chunk: int | None = None,
    kv_dtype: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompt ``tokens [B, T]`` (right-padded) through every layer; ``length`` (an int, or
    int32 ``[B]``: one per row) counts each row's real positions.

    ``runs`` covers the layers in order with ``(start, stop, attend)``: layers ``[start, stop)`` call
    ``attend(layer, q, k, v, length)`` (``tmjax.plan.layer_runs``, or one hook over all layers).
    Returns the final hidden states ``[B, T, H]`` (before the final norm) and a cache of
    ``cache_size`` (default T) positions holding the prompt's keys and values, in ``kv_dtype``
    (default: the activations' dtype; ``float8_e4m3fn`` and ``int8`` keep per-vector scales, ``kv_quant``). With
    ``mesh`` (the weights' mesh), the cache is sharded by the rules and the attention runs per shard.

    Each layer runs its per-token parts over chunks of ``chunk`` tokens (default: all T at once):
    norm, q/k/v projections and RoPE write the full-sequence q, k, v (and the cache) chunk by chunk,
    the attention runs over the whole sequence, then the output projection, residual and MLP
    update the hidden states chunk by chunk. Activations beyond q/k/v, the attention output and
    the hidden states are O(chunk); the result does not depend on ``chunk`` (per-token maths).
    """
    c, w = params.config, params.weights
    batch, seq_len = tokens.shape
    cache_size = seq_len if cache_size is None else cache_size
    if cache_size < seq_len:
        raise ValueError(f"the prompt ({seq_len} positions) is longer than the cache ({cache_size})")
    if [layer for start, stop, _ in runs for layer in range(start, stop)] != list(range(c.num_layers)):
        raise ValueError(f"runs must cover layers 0..{c.num_layers - 1} in order, got {[r[:2] for r in runs]}")
    chunk = seq_len if chunk is None else min(chunk, seq_len)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (batch,))
    x = _embed(params, tokens)
    layer = DecoderLayer(c)

    def rope(start: jax.Array | int, size: int) -> tuple[jax.Array, jax.Array]:
        return _rope(c, start + jnp.arange(size), length)

    # the dtypes of q, k, v (the weights' and activations' promotion), without computing anything
    q_like, k_like, _ = jax.eval_shape(
        lambda x: layer.apply({"params": _layer(w["layers"], 0)}, x, *rope(0, 1), method="qkv"), x[:, :1])
    cache = KVCache.empty(c, batch, cache_size, k_like.dtype if kv_dtype is None else kv_dtype, mesh, k_like.dtype)

    for start, stop, fn in runs:

        def body(i: jax.Array, carry: tuple, fn: AttentionFn = fn) -> tuple:
            x, cache = carry
            weights = {"params": _layer(w["layers"], i)}

            def project(carry: tuple, start: jax.Array, fresh: jax.Array) -> tuple:
                # an overlapping last chunk rewrites its older rows with the same values: no mask needed
                q_all, k_all, v_all, cache = carry
                q, k, v = layer.apply(weights, _slice(x, start, chunk), *rope(start, chunk), method="qkv")
                return (_put(q_all, q, start), _put(k_all, k, start), _put(v_all, v, start),
                        cache.put(i, start, k, v, length))

            buffers = [jnp.zeros((batch, seq_len, heads, c.head_dim), like.dtype)
                       for heads, like in ((c.num_heads, q_like), (c.num_kv_heads, k_like), (c.num_kv_heads, k_like))]
            q, k, v, cache = _over_chunks(project, (*buffers, cache), seq_len, chunk)
            # The attention reads q, k, v and its output is read back materialised, as with chunks:
            # fusing RoPE into the attention (or the attention into the output projection) when
            # there is one chunk would round differently, and the result would depend on the chunking.
            q, k, v = lax.optimization_barrier((q, k, v))
            op = functools.partial(fn, i)
            if mesh is not None:
                op = sharding.shard_attention(op, mesh)
            attended = lax.optimization_barrier(op(q, k, v, length))

            def finish(x: jax.Array, start: jax.Array, fresh: jax.Array) -> jax.Array:
                rows = _slice(x, start, chunk)  # older rows of an overlapping last chunk are done: keep them
                out = layer.apply(weights, rows, _slice(attended, start, chunk), method="finish")
                return _put(x, jnp.where(fresh[None, :, None], out, rows), start)

            return _over_chunks(finish, x, seq_len, chunk), cache

        x, cache = lax.fori_loop(start, stop, body, (x, cache))
    return x, cache.replace(length=length)


def _decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, position: jax.Array, window: jax.Array | None,
                      k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                      recent_k: jax.Array | None = None, recent_v: jax.Array | None = None,
                      sink_k: jax.Array | None = None, sink_v: jax.Array | None = None) -> jax.Array:
    """One query per sequence, ``q [B, 1, Hq, D]``, against ``k/v [B, S, Hkv, D]``: row ``b`` sees the
    keys at ``<= position[b]`` (and ``> position[b] - window`` where the window is > 0). A one-byte cache
    passes its scales ``[B, S, Hkv]``: each key's scores are scaled by its key scale and each
    probability by its value's scale (attention to the dequantized cache, never materialised), its
    ring ``recent_k/recent_v [B, W, Hkv, D]`` and its sinks ``sink_k/sink_v [B, N, Hkv, D]``: each seen
    position ``p`` is read once, from the ring if ``p > position - W``, else from the sinks if ``p < N``
    (both exact), else from ``k/v``, all in one softmax."""
    batch, _, num_heads, dim = q.shape
    num_kv = k.shape[2]
    qg = q.reshape(batch, num_kv, num_heads // num_kv, dim)
    now = position[:, None]

    def scores_of(keys_: jax.Array, held: jax.Array, visible: jax.Array) -> jax.Array:
        """Scores ``[B, Hkv, G, n]`` of keys at positions ``held [B, n]``, -inf where not ``visible``."""
        if window is not None:
            visible &= (window == 0) | (held > now - window)
        got = jnp.einsum("bhgd,bshd->bhgs", qg, keys_.astype(q.dtype), preferred_element_type=jnp.float32)
        return jnp.where(visible[:, None, None, :], got * (dim ** -0.5), -jnp.inf)

    def weighted(probs: jax.Array, values: jax.Array) -> jax.Array:
        return jnp.einsum("bhgs,bshd->bhgd", probs.astype(q.dtype), values.astype(q.dtype),
                          preferred_element_type=jnp.float32)

    keys = jnp.arange(k.shape[1])[None, :]
    visible = keys <= now  # [B, S]
    exact = []  # (keys, values [B, n, Hkv, D], their positions [B, n], visible): read instead of k, v there
    if recent_k is not None:
        ring, sinks = recent_k.shape[1], jnp.arange(sink_k.shape[1])[None, :]
        held = now - (now - jnp.arange(ring)[None, :]) % ring  # slot -> its position
        exact = [(recent_k, recent_v, held, held >= 0), (sink_k, sink_v, sinks, sinks <= now - ring)]
        visible &= (keys <= now - ring) & (keys >= sink_k.shape[1])
    scores = scores_of(k, keys, visible)
    if k_scale is not None:
        scores = scores * jnp.swapaxes(k_scale, 1, 2)[:, :, None, :]
    scores = jnp.concatenate([scores, *(scores_of(ek, held, seen) for ek, _, held, seen in exact)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    cached, at = probs[..., :k.shape[1]], k.shape[1]
    if v_scale is not None:
        cached = cached * jnp.swapaxes(v_scale, 1, 2)[:, :, None, :]
    out = weighted(cached, v)
    for _, values, held, _ in exact:
        out += weighted(probs[..., at:at + held.shape[1]], values)
        at += held.shape[1]
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
        x, cache = carry

        def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, KVCache]:
            new = cache.put_rows(i, rows, position, k[:, 0], v[:, 0])
            window = None if windows is None else windows[i]
            layer_k, layer_v, *quant_parts = new.layer(i)
            return _decode_attention(q, layer_k, layer_v, position, window, *quant_parts), new

        return layer.apply({"params": _layer(w["layers"], i)}, x, cos, sin, attend)

    x, cache = lax.fori_loop(0, c.num_layers, body, (x, cache))
    return logits(params, x[:, 0]), cache.replace(length=position + 1)
