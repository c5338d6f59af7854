"""Invisible values: a value at a position a row cannot see never reaches that row.

K or V, NaN or Inf, padding or a real key: ``0 * NaN`` in P.V would poison rows that cannot see the
key. Two ways to the same guarantee: kernels that mask inside their steps (triton, tpu) call
``guard_masked_step`` on each masked step; kernels whose steps use V as it is (xla, mosaic_gpu,
cuDNN) get K and V through ``guard_values`` once, before the kernel (the dispatch does it for them).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from tmjax.pallas_kernels.lengths import row_lengths

# Finite stand-in for -inf: a row whose keys so far are all masked keeps finite statistics, and the
# first visible key wipes them out (its rescale factor exp2(MASK - m) is exactly 0).
MASK_VALUE = -1e30


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
    """K and V for kernels whose steps use V as it is: the same guarantee as ``guard_masked_step``,
    prepared in one pass before the kernel. ``length`` as in ``lengths.row_lengths``.

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


GUARDS = ("always", "nonfinite")


def guarded(body: Callable[[jax.Array, jax.Array], jax.Array], k: jax.Array, v: jax.Array,
            length: int | jax.Array | None, when: str) -> jax.Array:
    """``body(k, v)`` with K and V through ``guard_values`` ``when="always"``, or ``when="nonfinite"`` only
    if V holds a non-finite entry, which one read of V decides on device. With every value finite
    nothing needs guarding: a weight the mask zeroes is exactly 0, and 0 times a finite value is 0, so
    rows before their length come out as guarded ones do (padding included), and the pass that copies
    K and V is skipped. K's own non-finite entries need no guard either way (see ``guard_values``)."""
    if when not in GUARDS:
        raise ValueError(f"when must be one of {GUARDS}, got {when!r}")
    if when == "always":
        return body(*guard_values(k, v, length))
    return lax.cond(jnp.isfinite(v).all(), body, lambda k, v: body(*guard_values(k, v, length)), k, v)
