"""Ragged rows: the ``length`` rule every backend follows, and per-row slicing of right-padded inputs.

A batch is right-padded to ``T``; ``length`` gives each row's true length: None (every row is ``T``
long), an int or integer scalar (all rows), or an integer array ``[B]`` (one per row). Output rows at
or past a row's length are unspecified. This module imports nothing else of the stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def row_lengths(length: int | jax.Array | np.ndarray | None, batch: int, seq_len: int) -> jax.Array:
    """The true length of every row, int32 ``[batch]``.

    Concrete values outside ``[1, seq_len]`` raise ``ValueError``; traced values cannot be checked
    and are clipped to ``[0, seq_len]`` (a row of length 0 has no visible output).
    """
    if length is None:
        return jnp.full((batch,), seq_len, jnp.int32)
    if isinstance(length, bool):
        raise ValueError(f"length must be an int or an integer array, got {length!r}")
    if isinstance(length, (int, np.integer)):
        if not 1 <= length <= seq_len:
            raise ValueError(f"length must be in [1, {seq_len}], got {length}")
        return jnp.full((batch,), int(length), jnp.int32)
    arr = length if isinstance(length, jax.Array) else np.asarray(length)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"length must be an int or an integer array, got dtype {arr.dtype}")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != batch):
        raise ValueError(f"length must be a scalar or have shape [{batch}] (one per row), got shape {tuple(arr.shape)}")
    if not isinstance(arr, jax.core.Tracer):
        values = np.asarray(arr).reshape(-1)
        bad = values[(values < 1) | (values > seq_len)]
        if bad.size:
            raise ValueError(f"length must be in [1, {seq_len}], got {int(bad[0])}")
    return jnp.broadcast_to(jnp.clip(jnp.asarray(arr, jnp.int32), 0, seq_len), (batch,))


def static_length(length: int | jax.Array | None, seq_len: int) -> int | None:
    """The common length of every row when it is known at trace time, else None."""
    if length is None:
        return seq_len
    if isinstance(length, (int, np.integer)) and not isinstance(length, bool):
        return int(length)
    return None


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_seq(x: jax.Array, padded_len: int) -> jax.Array:
    """Right-pad axis 1 with zeros to ``padded_len`` (no copy when already that long)."""
    extra = padded_len - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))


def take_rows(x: jax.Array, start: jax.Array, rows: int) -> jax.Array:
    """``x[b, start[b] : start[b] + rows]`` for every row ``b`` of ``x [B, T, ...]``."""
    if x.shape[0] == 1:
        return jax.lax.dynamic_slice_in_dim(x, start[0], rows, axis=1)
    return jax.vmap(lambda xb, sb: jax.lax.dynamic_slice_in_dim(xb, sb, rows, axis=0))(x, start)


def put_rows(x: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """``x`` with ``x[b, start[b] : start[b] + R] = rows[b]``, one in-place update per batch row (a
    loop rather than a scatter, so XLA never copies the whole of ``x``)."""
    if x.shape[0] == 1:
        return jax.lax.dynamic_update_slice_in_dim(x, rows, start[0], axis=1)

    def put(b, out):
        row = jax.lax.dynamic_slice_in_dim(rows, b, 1, axis=0)
        return jax.lax.dynamic_update_slice(out, row, (b, start[b]) + (0,) * (x.ndim - 2))

    return jax.lax.fori_loop(0, x.shape[0], put, x)
