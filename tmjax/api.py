"""Public inference entry points: ``prefill``, ``decode_step``, ``generate`` (each one jitted program)
and ``generate_from`` (decoding from a prefill's result).

A batch may hold prompts of different lengths. They are right-padded to the *bucket* of the longest
(``bucket_length``) and every row's true length travels as a traced ``[B]`` array, so every batch
whose longest prompt falls in one bucket reuses one compiled program; padding changes no result
(attention hides padded keys, each row's logits come from its own last real position, its cache
counts only its real positions, and decoding continues each row at its own position).

Weights placed on a device mesh (``tmjax.load(path, mesh=...)``) make every entry point run over that
mesh: the batch is split over its ``data`` axis, heads and the MLP over its ``model`` axis
(``tmjax.models.sharding``). Every argument is checked on the host first, with an error that names it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tmjax import memory, plan
from tmjax.attention import IMPLEMENTATIONS
from tmjax.layout import Layout, check_layout
from tmjax.models import decoder, sharding
from tmjax.models.config import ModelConfig
from tmjax.models.decoder import KVCache
from tmjax.models.params import Params

_ALIGN = 128  # bucket and cache sizes are multiples of this (kernel block sizes divide it)
# Models already warned about a prompt beyond max_position_embeddings (the warning is given once per model).
_WARNED_POSITIONS: set[ModelConfig] = set()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(length: int) -> int:
    """The padded length of a ``length``-token prompt: the next multiple of 128 up to 4096, then 16
    steps per doubling (next multiple of ``2**(floor(log2 length) - 4)``), so padding past 2048 tokens
    wastes < 6.25% (padded rows cost what real ones do) for one compiled program per step."""
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    return _round_up(length, max(_ALIGN, 2 ** (length.bit_length() - 5)))


# --- argument checks ---------------------------------------------------------------------------------

def _concrete(value: object, name: str) -> np.ndarray:
    """``value`` as a numpy array; ``TypeError`` for traced values and things that are not numbers."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete value, not a traced one (call this outside jax.jit)")
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"{name} must be a number or an array of numbers, got {type(value).__name__} {value!r}")
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a number or an array of numbers, got {type(value).__name__}: {err}") from None


def _int_array(value: object, name: str) -> np.ndarray:
    arr = None if isinstance(value, (str, bytes)) else _concrete(value, name)
    if arr is None or arr.dtype.kind not in "iu":
        got = type(value).__name__ if arr is None else f"dtype {arr.dtype}"
        raise TypeError(f"{name} must be integers (token ids; encode text with the tokenizer first), got {got}")
    return arr


def _int(value: object, name: str, low: int) -> int:
    """A Python int from an int, a numpy integer or a 0-d integer array, checked ``>= low``."""
    arr = _concrete(value, name)
    if isinstance(value, bool) or arr.ndim != 0 or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if int(arr) < low:
        raise ValueError(f"{name} must be >= {low}, got {int(arr)}")
    return int(arr)


def _check_params(params: object) -> Params:
    if not isinstance(params, Params):
        raise TypeError(f"params must be tmjax Params (params = tmjax.load(checkpoint_folder)), "
                        f"got {type(params).__name__}")
    return params


def _check_implementation(implementation: object) -> None:
    if implementation is not None and (not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS):
        raise ValueError(f"implementation must be None (the platform default) or one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")


def _check_ids(arr: np.ndarray, name: str, vocab_size: int) -> None:
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name}: token ids must be in [0, {vocab_size}), got min {low} max {high}")


def _rows(tokens: object, lengths: object, vocab_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Prompts as right-padded int32 ``[B, T]`` (zeros after each row's end), their lengths ``[B]``,
    and whether the caller gave one unbatched prompt. ``tokens``: ``[T]``, ``[B, T]`` (with optional
    ``lengths [B]``) or a list of 1-D token sequences."""
    if isinstance(tokens, (list, tuple)) and tokens and all(np.ndim(row) == 1 for row in tokens):
        if lengths is not None:
            raise ValueError("lengths: a list of token sequences carries its own lengths; pass lengths only "
                             "with [B, T] tokens")
        rows = []
        for i, row in enumerate(tokens):
            if np.size(row) == 0:
                raise ValueError(f"tokens[{i}] is empty")
            rows.append(_int_array(row, f"tokens[{i}]"))
            _check_ids(rows[-1], f"tokens[{i}]", vocab_size)
        lens = np.asarray([row.size for row in rows], np.int32)
        arr = np.zeros((len(rows), int(lens.max())), np.int32)
        for i, row in enumerate(rows):
            arr[i, :row.size] = row
        return arr, lens, False
    arr = _int_array(tokens, "tokens")
    if arr.size == 0:
        raise ValueError(f"tokens are empty (shape {arr.shape})")
    if arr.ndim not in (1, 2):
        raise ValueError(f"tokens must be [T], [B, T] or a list of 1-D token sequences, got shape {arr.shape}")
    squeeze = arr.ndim == 1
    arr = arr[None] if squeeze else arr
    batch, width = arr.shape
    if lengths is None:
        lens = np.full(batch, width, np.int32)
    else:
        if isinstance(lengths, (list, tuple)) and any(isinstance(n, (bool, np.bool_)) for n in lengths):
            raise TypeError(f"lengths must be integers, not booleans (numpy would read True as 1), got {lengths!r}")
        lens = _int_array(lengths, "lengths")
        lens = lens.reshape(-1) if squeeze else lens  # one prompt: an int or [1]
        if lens.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}] (one per row of tokens), got shape {lens.shape}")
        if lens.min() < 1 or lens.max() > width:
            raise ValueError(f"lengths must be in [1, {width}] (the width of tokens), got {lens.tolist()}")
        lens = lens.astype(np.int32)
    real = np.arange(width)[None, :] < lens[:, None]
    _check_ids(arr[real], "tokens", vocab_size)
    return np.where(real, arr, 0).astype(np.int32), lens, squeeze


# The cap on max_new_tokens is never below this (check_new_tokens).
NEW_TOKENS_FLOOR = 1024


def check_new_tokens(config: ModelConfig, new: int, name: str) -> None:
    """Refuse more new tokens than the documented cap, the model's ``max_position_embeddings`` or
    ``NEW_TOKENS_FLOOR`` if larger (so that the defaults run on small test models): the cache grows by
    ``new`` rows, and a request like ``10**9`` would otherwise end in an out-of-memory error from XLA."""
    cap = max(config.max_position_embeddings, NEW_TOKENS_FLOOR)
    if new > cap:
        raise ValueError(f"{name} must be at most {cap} (the model's max_position_embeddings "
                         f"{config.max_position_embeddings}, or {NEW_TOKENS_FLOOR} if larger), got {new}")


def _warn_beyond_positions(config: ModelConfig, longest: int) -> None:
    """Warn once per model when a prompt is longer than the positions it was trained on."""
    if longest > config.max_position_embeddings and config not in _WARNED_POSITIONS:
        _WARNED_POSITIONS.add(config)
        warnings.warn(
            f"a prompt of {longest} tokens is longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); positions past it were not trained and the output may degrade "
            "(this warning is given once per model)", UserWarning, stacklevel=4)


def _prepare(params: object, tokens: object, lengths: object, layout: object, implementation: object,
             max_new_tokens: object, *, minimum: int) -> tuple[Params, np.ndarray, np.ndarray, int, int, bool]:
    """Check a request and bucket it: (params, tokens right-padded to the bucket of the longest row,
    the rows' lengths, max_new_tokens, the cache size with room for them, whether the caller's tokens
    had no batch axis). The one place the layout is validated: its type, its switch layer against the
    model, and its sparse layers against the model's sliding windows at the true prompt lengths."""
    params = _check_params(params)
    check_layout(layout)
    _check_implementation(implementation)
    config = params.config
    if layout is not None:
        layout.check_layers(config.num_layers)
    arr, lens, squeeze = _rows(tokens, lengths, config.vocab_size)
    new = _int(max_new_tokens, "max_new_tokens", minimum)
    check_new_tokens(config, new, "max_new_tokens")
    longest = int(lens.max())
    plan.check_windows(config, layout, longest)
    _warn_beyond_positions(config, longest)
    padded = bucket_length(longest)
    batch = np.pad(arr, ((0, 0), (0, padded - arr.shape[1])))
    return params, batch, lens, new, _round_up(padded + new, _ALIGN), squeeze


def _place(mesh: Mesh | None, tokens: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Tokens and lengths on the device, split over the mesh's data axis when there is a mesh."""
    if mesh is None:
        return jnp.asarray(tokens), jnp.asarray(lengths)
    return (jax.device_put(tokens, sharding.named(("batch", "seq"), mesh)),
            jax.device_put(lengths, sharding.named(("batch",), mesh)))


def _check_batch_splits(mesh: Mesh | None, batch: int, name: str) -> None:
    ways = sharding.batch_multiple(mesh)
    if batch % ways:
        raise ValueError(f"{name}: a batch of {batch} rows does not split over the mesh's {sharding.DATA!r} axis "
                         f"({ways} devices); pass a multiple of {ways} rows (tmjax.generate pads the batch itself)")


def _sampling(temperature: object, key: object, eos_token_id: object, vocab_size: int
              ) -> tuple[jax.Array, jax.Array, jax.Array, bool]:
    """(EOS ids padded with -1, temperature, PRNG key, whether to sample) from the user's arguments."""
    temp = _concrete(temperature, "temperature")
    if isinstance(temperature, bool) or temp.ndim != 0 or temp.dtype.kind not in "fiu":
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
    temp = float(temp)
    if not (np.isfinite(temp) and temp >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temp}")
    sample = temp > 0
    if key is not None:
        if isinstance(key, jax.core.Tracer) or not isinstance(key, jax.Array) or not (
                (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ())
                or (key.dtype == jnp.uint32 and key.shape == (2,))):
            raise TypeError(f"key must be a PRNG key such as jax.random.key(0), got {type(key).__name__} "
                            f"{getattr(key, 'dtype', '')}{list(getattr(key, 'shape', []))}")
    elif sample:
        raise ValueError(f"temperature={temp} samples and needs a PRNG key (key=jax.random.key(seed))")
    eos_ids = np.zeros(0, np.int64)
    if eos_token_id is not None:
        eos_ids = None if isinstance(eos_token_id, (str, bytes, bool)) else _concrete(eos_token_id, "eos_token_id")
        if eos_ids is None or eos_ids.ndim > 1 or (eos_ids.size and eos_ids.dtype.kind not in "iu"):
            raise TypeError(f"eos_token_id must be a token id (int) or a list of ids (e.g. tokenizer.eos_token_id), "
                            f"got {type(eos_token_id).__name__} {eos_token_id!r}")
        eos_ids = eos_ids.reshape(-1)
        if eos_ids.size and (eos_ids.min() < 0 or eos_ids.max() >= vocab_size):
            raise ValueError(f"eos_token_id must be in [0, {vocab_size}) (the vocabulary), got {eos_ids.tolist()}")
    # padded with -1 (matches no token) to a multiple of 4, so that the id count rarely recompiles
    eos = np.full(_round_up(max(eos_ids.size, 1), 4), -1, np.int32)
    eos[:eos_ids.size] = eos_ids
    key = jax.random.key(0) if key is None else key
    return jnp.asarray(eos), jnp.float32(temp if sample else 1.0), key, sample


def _check_cache(cache: object, config: ModelConfig) -> KVCache:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be the KVCache returned by tmjax.prefill or decode_step, got {type(cache).__name__}")
    expected = (config.num_layers, config.num_kv_heads, config.head_dim)
    got = (cache.k.shape[0], *cache.k.shape[3:])
    if cache.k.ndim != 5 or got != expected or cache.length.shape != cache.k.shape[1:2]:
        raise ValueError(f"cache (k {cache.k.shape}, length {cache.length.shape}) does not belong to this model "
                         f"([layers, batch, positions, kv_heads, head_dim] = [{expected[0]}, B, S, {expected[1]}, "
                         f"{expected[2]}], length [B])")
    return cache


def _check_room(cache: KVCache, steps: int) -> None:
    """Raise ``ValueError`` unless every row has room for ``steps`` more positions."""
    filled = int(jnp.max(cache.length))  # a replicated scalar, readable by every process of a multi-host mesh
    if filled + steps > cache.max_length:
        raise ValueError(f"the cache is full ({filled} of {cache.max_length} positions used, {steps} more needed); "
                         "prefill with a larger max_new_tokens")


# --- programs ------------------------------------------------------------------------------------------

def _prefill_logits(params: Params, tokens: jax.Array, length: jax.Array, layout: Layout | None,
                    implementation: str | None, cache_size: int, mesh: Mesh | None, chunk: int | None = None,
                    kv_dtype: str | None = None) -> tuple[jax.Array, KVCache]:
    runs = plan.layer_runs(params.config, layout, tokens.shape[1], implementation)
    hidden, cache = decoder.prefill_hidden(params, tokens, length, runs=runs, cache_size=cache_size, mesh=mesh,
                                           chunk=chunk, kv_dtype=kv_dtype)
    last = jnp.take_along_axis(hidden, (length - 1)[:, None, None], axis=1)[:, 0]  # each row's last real position
    return decoder.logits(params, last), cache


_prefill = jax.jit(_prefill_logits, static_argnames=("layout", "implementation", "cache_size", "mesh", "chunk",
                                                     "kv_dtype"))


def _decode_loop(params: Params, logits: jax.Array, cache: KVCache, eos: jax.Array, temperature: jax.Array,
                 key: jax.Array, max_new_tokens: int, sample: bool) -> jax.Array:
    """Pick a token from ``logits``, then decode until ``max_new_tokens`` or every row has hit EOS."""
    def pick(logits: jax.Array, key: jax.Array) -> jax.Array:
        if sample:
            return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def finished(token: jax.Array) -> jax.Array:
        return jnp.any(token[:, None] == eos[None, :], axis=-1)

    key, sub = jax.random.split(key)
    token = pick(logits, sub)
    out = jnp.zeros((logits.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)

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


_continue = jax.jit(_decode_loop, static_argnames=("max_new_tokens", "sample"))


@functools.partial(jax.jit, static_argnames=("layout", "implementation", "cache_size", "mesh", "max_new_tokens",
                                             "sample", "chunk", "kv_dtype"))
def _generate(params: Params, tokens: jax.Array, length: jax.Array, eos: jax.Array, temperature: jax.Array,
              key: jax.Array, layout: Layout | None, implementation: str | None, cache_size: int, mesh: Mesh | None,
              max_new_tokens: int, sample: bool, chunk: int | None = None, kv_dtype: str | None = None) -> jax.Array:
    logits, cache = _prefill_logits(params, tokens, length, layout, implementation, cache_size, mesh, chunk, kv_dtype)
    return _decode_loop(params, logits, cache, eos, temperature, key, max_new_tokens, sample)


# --- public entry points -------------------------------------------------------------------------------

def prefill(
    params: Params,
    tokens: object,
    layout: Layout | None = None,
    *,
    lengths: object = None,
    implementation: str | None = None,
    max_new_tokens: int = 256,
    chunk: int | None = None,
    kv_dtype: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run prompts and return each one's next-token logits (float32) and the KV cache.

    ``tokens``: integer ``[B, T]`` (logits ``[B, V]``), ``[T]`` (logits ``[V]``, cache batch 1), or a
    list of 1-D token sequences of any lengths (logits ``[B, V]``). With ``[B, T]`` tokens,
    ``lengths [B]`` gives each row's true length (the rest of the row is ignored). ``layout=None`` is
    dense attention in every layer. ``implementation`` picks the attention backend (None: the
    platform default). The cache holds the padded prompts plus room for at least ``max_new_tokens``
    decode steps; ``cache.length [B]`` is each row's length. ``chunk`` tokens at a time run through
    each layer's per-token parts (None: ``tmjax.memory.default_chunk``); ``kv_dtype`` is the cache's
    dtype (None: the weights'; ``"float8_e4m3fn"`` / ``"int8"``: one byte per number with per-vector scales
    and the first ``kv_quant.SINKS`` and last ``kv_quant.RECENT`` positions exact; int8 rounds less). A
    request the device cannot hold (``tmjax.memory_estimate``) raises ``ValueError`` before compiling.
    """
    params, batch, lens, new, cache_size, squeeze = _prepare(params, tokens, lengths, layout, implementation,
                                                              max_new_tokens, minimum=0)
    chunk, kv_dtype = memory.preflight(params, batch.shape[0], int(lens.max()), layout, implementation, new, chunk,
                                       kv_dtype)
    mesh = sharding.params_mesh(params)
    _check_batch_splits(mesh, batch.shape[0], "tokens")
    out, cache = _prefill(params, *_place(mesh, batch, lens), layout, implementation, cache_size, mesh, chunk,
                          kv_dtype)
    return (out[0] if squeeze else out), cache


_decode = jax.jit(decoder.decode)
# Donating the cache lets XLA write the step's keys and values in place instead of copying the cache.
_decode_donating = jax.jit(decoder.decode, donate_argnums=(2,))


def decode_step(params: Params, token: object, cache: KVCache, *, donate: bool = False) -> tuple[jax.Array, KVCache]:
    """Append one token per sequence (``[B]``, or a scalar for batch 1), each row at its own position
    ``cache.length[b]``, and return the float32 logits of the next one (``[B, V]``, or ``[V]``) and
    the updated cache; attention is dense over the cache. ``donate=True`` (ignored on CPU, which cannot
    donate) updates the cache in place instead of copying it each step, and invalidates the cache
    passed in: use the returned one."""
    params = _check_params(params)
    cache = _check_cache(cache, params.config)
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {type(donate).__name__}")
    arr = _int_array(token, "token")
    if arr.ndim > 1 or arr.size == 0:
        raise ValueError(f"token must be a scalar or [B] (one per row), got shape {arr.shape}")
    _check_ids(arr, "token", params.config.vocab_size)
    squeeze = arr.ndim == 0
    arr = arr.reshape(-1).astype(np.int32)
    if arr.shape[0] != cache.k.shape[1]:
        raise ValueError(f"token: {arr.shape[0]} tokens for a cache of batch {cache.k.shape[1]}")
    _check_room(cache, 1)
    step = _decode_donating if donate and jax.default_backend() != "cpu" else _decode
    out, cache = step(params, jnp.asarray(arr), cache)
    return (out[0] if squeeze else out), cache


def generate(
    params: Params,
    tokens: object,
    max_new_tokens: int,
    layout: Layout | None = None,
    *,
    lengths: object = None,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    implementation: str | None = None,
    chunk: int | None = None,
    kv_dtype: str | None = None,
) -> jax.Array:
    """Prefill (with ``layout``) then decode, all in one jitted program; returns int32 new tokens
    ``[B, max_new_tokens]`` (``[max_new_tokens]`` for ``[T]`` tokens). ``tokens``, ``lengths``,
    ``chunk`` and ``kv_dtype`` as in ``prefill``: every row continues from its own prompt.

    Greedy when ``temperature == 0``; otherwise samples from ``softmax(logits / temperature)`` with
    ``key``. A sequence that emits one of ``eos_token_id`` is finished: its later positions repeat
    that id, and decoding stops once every sequence is finished. On a mesh, the batch is padded to a
    multiple of the ``data`` axis and the padding rows are dropped from the result.
    """
    params, batch, lens, new, cache_size, squeeze = _prepare(params, tokens, lengths, layout, implementation,
                                                              max_new_tokens, minimum=1)
    chunk, kv_dtype = memory.preflight(params, batch.shape[0], int(lens.max()), layout, implementation, new, chunk,
                                       kv_dtype)
    eos, temp, key, sample = _sampling(temperature, key, eos_token_id, params.config.vocab_size)
    mesh = sharding.params_mesh(params)
    rows = batch.shape[0]
    extra = -rows % sharding.batch_multiple(mesh)
    batch, lens = np.pad(batch, ((0, extra), (0, 0))), np.pad(lens, (0, extra), constant_values=1)
    out = _generate(params, *_place(mesh, batch, lens), eos, temp, key, layout, implementation, cache_size, mesh,
                    new, sample, chunk, kv_dtype)[:rows]
    return out[0] if squeeze else out


def generate_from(
    params: Params,
    logits: jax.Array,
    cache: KVCache,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> jax.Array:
    """``generate``'s decoding, continued from ``prefill``'s result (``logits [B, V]`` and the cache):
    the same tokens as ``generate`` with the same arguments, with prefill timed apart. Returns int32
    ``[B, max_new_tokens]`` (``[max_new_tokens]`` for ``[V]`` logits); the cache needs room for
    ``max_new_tokens - 1`` steps."""
    params = _check_params(params)
    cache = _check_cache(cache, params.config)
    if not isinstance(logits, jax.Array):
        logits = jnp.asarray(_concrete(logits, "logits"))
    squeeze = logits.ndim == 1
    logits = logits[None] if squeeze else logits
    if logits.shape != (cache.k.shape[1], params.config.vocab_size):
        raise ValueError(f"logits must be [B, V] = [{cache.k.shape[1]}, {params.config.vocab_size}] (prefill's "
                         f"logits for this cache), got shape {logits.shape}")
    new = _int(max_new_tokens, "max_new_tokens", 1)
    _check_room(cache, new - 1)
    eos, temp, key, sample = _sampling(temperature, key, eos_token_id, params.config.vocab_size)
    out = _continue(params, logits, cache, eos, temp, key, new, sample)
    return out[0] if squeeze else out
