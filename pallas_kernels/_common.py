"""What the backends share: input checks, padding (the xla backend too), and the Pallas two-pass Triangle driver.

Triangle attention = a band (sinks + local window, causal) that a static block table describes over
the padded length, plus the dense last rows ``[length - n_last, length)``, whose position depends on
the true ``length`` (possibly a traced scalar). So every backend runs:

1. the band pass: a block-sparse kernel following ``block_tables.band_table`` over all rows;
2. the last-rows pass: for each batch row ``b``, the ``n_last`` rows starting at
   ``start[b] = length[b] - n_last`` (a dynamic slice) against every earlier key, with ``start``
   given to the kernel as an int32 ``[B]`` array; GPU backends split it over KV chunks and merge the
   chunks by log-sum-exp;
3. a splice: rows in ``[length[b] - n_last, length[b])`` take the last-rows result.

``length`` may be one length for the whole batch or one per row (``row_lengths``).

Dense causal attention is the band pass alone with ``block_tables.causal_table``.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tmjax.pallas_kernels.block_tables import BlockTable, band_table, causal_table

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
# Finite stand-in for -inf: a row whose keys so far are all masked keeps finite statistics, and the
# first visible key wipes them out (its rescale factor exp2(MASK - m) is exactly 0).
MASK_VALUE = -1e30
LOG2E = math.log2(math.e)

BandPass = Callable[[jax.Array, jax.Array, jax.Array, BlockTable], jax.Array]
RowsPass = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, backend: str) -> None:
    """Raise ``ValueError`` for dtypes or head dims the Pallas kernels do not implement."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{backend} attention supports bfloat16 and float16 inputs; {name} is {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{backend} attention supports head_dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]} "
            "(use implementation='xla' for other head dims)"
        )


def interpret_mode(flag: bool | None) -> bool:
    """Run a Pallas kernel in the interpreter: as ``flag`` says, else on CPU or when
    ``TMJAX_PALLAS_INTERPRET=1``."""
    if flag is not None:
        return flag
    return jax.default_backend() == "cpu" or os.environ.get("TMJAX_PALLAS_INTERPRET", "") not in ("", "0")


def guard_masked_step(qk: jax.Array, visible: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scores and values of a masked step such that keys a row cannot see never reach it.

    ``qk`` ``[rows, keys]``, ``visible`` its bool mask, ``v`` ``[keys, D]``. Non-finite values are
    zeroed (``0 * NaN`` in P.V would otherwise poison rows that cannot see the key), and a visible key
    whose value was not finite gets a NaN score, so the rows that see it still come out non-finite.
    Unmasked steps need none of this: every row sees every key there.
    """
    finite = jnp.abs(v.astype(jnp.float32)) < jnp.inf
    bad = jnp.max(jnp.where(finite, 0, 1), axis=1) == 1
    qk = jnp.where(visible, jnp.where(bad[None, :], jnp.nan, qk), MASK_VALUE)
    return qk, jnp.where(finite, v, jnp.zeros_like(v))


def guard_values(k: jax.Array, v: jax.Array, length: int | jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """K and V for kernels whose steps use V as it is (mosaic_gpu, cuDNN, xla): the same guarantee as
    ``guard_masked_step``, prepared in one pass before the kernel. ``length`` as in ``row_lengths``.

    V's non-finite entries and its padding (positions at or past each row's length) become 0, so
    ``0 * NaN`` never reaches a row that cannot see the position; a real key whose value held a
    non-finite entry gets a NaN key instead, so a row that sees it gets a NaN score and turns
    non-finite, while a row that cannot see it masks that score away. K's own non-finite entries need
    nothing: a masked score is replaced, never multiplied.
    """
    finite = jnp.isfinite(v)
    bad = ~finite.all(axis=-1, keepdims=True)  # [B, T, H, 1]
    keep = finite
    if length is not None:
        lengths = row_lengths(length, v.shape[0], v.shape[1])
        real = (jnp.arange(v.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
        keep &= real
        bad &= real
    return jnp.where(bad, jnp.asarray(jnp.nan, k.dtype), k), jnp.where(keep, v, jnp.zeros((), v.dtype))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_seq(x: jax.Array, padded_len: int) -> jax.Array:
    """Right-pad axis 1 with zeros to ``padded_len`` (no copy when already that long)."""
    extra = padded_len - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))


def row_lengths(length: int | jax.Array | np.ndarray | None, batch: int, seq_len: int) -> jax.Array:
    """The true length of every row, int32 ``[batch]``.

    ``length`` is None (every row is ``seq_len`` long), an int or integer scalar (all rows), or an
    integer array ``[batch]`` (one per row). Concrete values outside ``[1, seq_len]`` raise
    ``ValueError``; traced values cannot be checked and are clipped to ``[0, seq_len]`` (a row of
    length 0 has no visible output).
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


def merge_partials(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Combine attention over disjoint key chunks (axis 0), normalised per chunk.

    ``out`` ``[C, ..., D]`` (float32), ``lse`` ``[C, ...]`` log-sum-exp in base 2 (``-inf`` for a
    chunk with no key). Returns the float32 result over all chunks.
    """
    peak = jnp.max(lse, axis=0)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weight = jnp.exp2(lse - peak)
    total = jnp.sum(weight, axis=0)
    merged = jnp.sum(weight[..., None] * out, axis=0)
    return merged / jnp.where(total == 0, 1.0, total)[..., None]


def triangle_two_pass(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    n_init: int,
    n_local: int,
    n_last: int,
    length: int | jax.Array | None,
    block_q: int,
    block_kv: int,
    rows_block: int,
    band_pass: BandPass,
    rows_pass: RowsPass,
) -> jax.Array:
    """Triangle attention from a backend's band pass and last-rows pass (see the module docstring).

    ``band_pass(q, k, v, table)`` gets inputs padded to a multiple of both block sizes;
    ``rows_pass(q_rows, k, v, start)`` gets ``R`` query rows per batch row (``R`` = ``min(n_last, T)``
    rounded up to ``rows_block``) whose first row sits at position ``start[b]`` (int32 ``[B]``: each
    row's length may differ) and returns their attention over all keys ``<= row``, ``[B, R, Hq, D]``.
    """
    seq_len = q.shape[1]
    padded = round_up(seq_len, math.lcm(block_q, block_kv, rows_block))
    qp, kp, vp = (pad_seq(x, padded) for x in (q, k, v))
    table = band_table(padded, block_q, block_kv, n_init=n_init, n_local=n_local)
    out = band_pass(qp, kp, vp, table)
    if n_last > 0:
        # XLA's GPU dynamic-slice fusion rejects a kernel's result as the direct target of the
        # in-place update below (seen with jax 0.11.2); the barrier keeps it a plain buffer.
        out = jax.lax.optimization_barrier(out)
        lengths = row_lengths(length, q.shape[0], seq_len)
        rows = round_up(min(n_last, seq_len), rows_block)
        start = jnp.clip(lengths - n_last, 0, padded - rows).astype(jnp.int32)  # [B]
        last = rows_pass(take_rows(qp, start, rows), kp, vp, start).astype(out.dtype)
        if seq_len - n_last > padded - rows:
            # start is clipped below length - n_last for the longest lengths: the rows written
            # before the dense ones must keep the band result.
            dense = (start[:, None] + jnp.arange(rows)) >= (lengths - n_last)[:, None]
            last = jnp.where(dense[:, :, None, None], last, take_rows(out, start, rows))
        # Otherwise every written row is dense or at/after its length (unspecified): plain in-place
        # updates, which XLA does not turn into a copy of the whole output.
        out = put_rows(out, last, start)
    return out[:, :seq_len]


def causal_one_pass(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int, block_kv: int, band_pass: BandPass
) -> jax.Array:
    """Dense causal attention: the band pass over a causal table (right padding needs no ``length``:
    a query before the true length never sees a key after it)."""
    seq_len = q.shape[1]
    padded = round_up(seq_len, math.lcm(block_q, block_kv))
    qp, kp, vp = (pad_seq(x, padded) for x in (q, k, v))
    return band_pass(qp, kp, vp, causal_table(padded, block_q, block_kv))[:, :seq_len]
