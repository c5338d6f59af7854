"""Public inference entry points: ``prefill``, ``decode_step`` and ``generate``, each one jitted program.

Prompts are right-padded to a *bucket* length (``bucket_length``) and the true length travels as a
traced scalar, so every prompt length inside a bucket reuses one compiled program; padding changes
no result (attention hides padded keys, the logits come from the last real position, and the cache
counts only real positions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tmjax.layout import TriangleMix
from tmjax.models import decoder
from tmjax.models.decoder import KVCache
from tmjax.models.params import Params

_ALIGN = 128  # bucket and cache sizes are multiples of this (kernel block sizes divide it)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(length: int) -> int:
    """The padded length of a ``length``-token prompt: the next multiple of 128 up to 1024, then 8
    steps per doubling (next multiple of ``2**(floor(log2 length) - 3)``), so padding wastes < 12.5%."""
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    if length <= 1024:
        return _round_up(length, _ALIGN)
    return _round_up(length, 2 ** (length.bit_length() - 4))


def _tokens(tokens: object, vocab_size: int, rank: int) -> tuple[np.ndarray, bool]:
    """Validate on the host; returns int32 tokens with a batch axis and whether one was added."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        raise ValueError(f"tokens are empty (shape {arr.shape})")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.ndim not in (rank - 1, rank):
        raise ValueError(f"tokens must have rank {rank - 1} or {rank}, got shape {arr.shape}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {low} max {high}")
    squeeze = arr.ndim == rank - 1
    return (arr[None] if squeeze else arr).astype(np.int32), squeeze


def _prepare(params: Params, tokens: object, layout: TriangleMix | None, max_new_tokens: int, *, minimum: int
             ) -> tuple[np.ndarray, jax.Array, int, bool]:
    """Check a request and bucket it: (tokens right-padded to their bucket, the true length, the cache
    size with room for ``max_new_tokens``, whether the caller's tokens had no batch axis)."""
    if layout is not None:
        layout.check_layers(params.config.num_layers)
    arr, squeeze = _tokens(tokens, params.config.vocab_size, rank=2)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < minimum:
        raise ValueError(f"max_new_tokens must be an int >= {minimum}, got {max_new_tokens!r}")
    padded = bucket_length(arr.shape[1])
    batch = np.pad(arr, ((0, 0), (0, padded - arr.shape[1])))
    return batch, jnp.int32(arr.shape[1]), _round_up(padded + max_new_tokens, _ALIGN), squeeze


@functools.partial(jax.jit, static_argnames=("layout", "implementation", "cache_size"))
def _prefill(params: Params, tokens: jax.Array, length: jax.Array, layout: TriangleMix | None,
             implementation: str | None, cache_size: int) -> tuple[jax.Array, KVCache]:
    hidden, cache = decoder.prefill_hidden(params, tokens, length, layout=layout, cache_size=cache_size,
                                           implementation=implementation)
    last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=1, keepdims=False)
    return decoder.logits(params, last), cache


def prefill(
    params: Params,
    tokens: object,
    layout: TriangleMix | None = None,
    *,
    implementation: str | None = None,
    max_new_tokens: int = 256,
) -> tuple[jax.Array, KVCache]:
    """Run a prompt and return the next-token logits (float32) and the KV cache.

    ``tokens``: integer ``[B, T]`` (logits ``[B, V]``) or ``[T]`` (logits ``[V]``, cache batch 1).
    ``layout=None`` is dense attention in every layer. ``implementation`` picks the attention backend
    (None: the platform default). The cache holds the padded prompt plus room for at least
    ``max_new_tokens`` decode steps.
    """
    batch, length, cache_size, squeeze = _prepare(params, tokens, layout, max_new_tokens, minimum=0)
    out, cache = _prefill(params, batch, length, layout, implementation, cache_size)
    return (out[0] if squeeze else out), cache


_decode = jax.jit(decoder.decode)
# Donating the cache lets XLA write the step's keys and values in place instead of copying the cache.
_decode_donating = jax.jit(decoder.decode, donate_argnums=(2,))


def decode_step(params: Params, token: object, cache: KVCache, *, donate: bool = False) -> tuple[jax.Array, KVCache]:
    """Append one token per sequence (``[B]``, or a scalar for batch 1) and return the float32
    logits of the next one (``[B, V]``, or ``[V]``) and the updated cache; attention is dense over
    the cache. ``donate=True`` (ignored on CPU, which cannot donate) updates the cache in place
    instead of copying it each step, and invalidates the cache passed in: use the returned one."""
    arr, squeeze = _tokens(token, params.config.vocab_size, rank=1)
    if arr.shape[0] != cache.k.shape[1]:
        raise ValueError(f"{arr.shape[0]} tokens for a cache of batch {cache.k.shape[1]}")
    filled = int(cache.length)
    if filled >= cache.max_length:
        raise ValueError(f"the cache is full ({filled} of {cache.max_length} positions); "
                         "prefill with a larger max_new_tokens")
    step = _decode_donating if donate and jax.default_backend() != "cpu" else _decode
    out, cache = step(params, jnp.asarray(arr), cache)
    return (out[0] if squeeze else out), cache


@functools.partial(jax.jit, static_argnames=("layout", "implementation", "cache_size", "max_new_tokens", "sample"))
def _generate(params: Params, tokens: jax.Array, length: jax.Array, eos: jax.Array, temperature: jax.Array,
              key: jax.Array, layout: TriangleMix | None, implementation: str | None, cache_size: int,
              max_new_tokens: int, sample: bool) -> jax.Array:
    def pick(logits: jax.Array, key: jax.Array) -> jax.Array:
        if sample:
            return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def finished(token: jax.Array) -> jax.Array:
        return jnp.any(token[:, None] == eos[None, :], axis=-1)

    logits, cache = _prefill(params, tokens, length, layout, implementation, cache_size)
    key, sub = jax.random.split(key)
    token = pick(logits, sub)
    out = jnp.zeros((tokens.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)

    def cond(state: tuple) -> jax.Array:
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, out, token, done, cache, key = state
        logits, cache = decoder.decode(params, token, cache)
        key, sub = jax.random.split(key)
        token = jnp.where(done, token, pick(logits, sub))  # a finished row repeats its EOS
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        return step + 1, out, token, done | finished(token), cache, key

    state = jax.lax.while_loop(cond, body, (jnp.int32(1), out, token, finished(token), cache, key))
    step, out, token = state[:3]
    # stopped early (every row finished): the columns not reached repeat each row's EOS
    return jnp.where(jnp.arange(max_new_tokens) >= step, token[:, None], out)


def generate(
    params: Params,
    tokens: object,
    max_new_tokens: int,
    layout: TriangleMix | None = None,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Prefill (with ``layout``) then decode, all in one jitted program; returns int32 new tokens
    ``[B, max_new_tokens]`` (``[max_new_tokens]`` for ``[T]`` tokens).

    Greedy when ``temperature == 0``; otherwise samples from ``softmax(logits / temperature)`` with
    ``key``. A sequence that emits one of ``eos_token_id`` is finished: its later positions repeat
    that id, and decoding stops once every sequence is finished.
    """
    batch, length, cache_size, squeeze = _prepare(params, tokens, layout, max_new_tokens, minimum=1)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    sample = temperature > 0
    if sample and key is None:
        raise ValueError(f"temperature={temperature} samples and needs a PRNG key")
    eos_ids = [] if eos_token_id is None else [eos_token_id] if np.ndim(eos_token_id) == 0 else list(eos_token_id)
    # padded with -1 (matches no token) to a multiple of 4, so that the id count rarely recompiles
    eos = np.full(_round_up(max(len(eos_ids), 1), 4), -1, np.int32)
    eos[:len(eos_ids)] = eos_ids
    out = _generate(params, batch, length, jnp.asarray(eos),
                    jnp.float32(temperature if sample else 1.0), jax.random.key(0) if key is None else key,
                    layout, implementation, cache_size, max_new_tokens, sample)
    return out[0] if squeeze else out
