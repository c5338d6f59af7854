"""FlashAttention-3 (Hopper) through ``flash-attn3-jax``, the strongest attention kernels a JAX user can install.

Systems, each ``(name, pattern, fn(q, k, v))`` for ``bench/attention.py``: FA3 dense causal, FA3
sliding window alone (the triangle's band without sinks or last rows), and the Triangle layout composed
from FA3 calls: the sliding window (with its log-sum-exp), the sink keys outside the window in plain
XLA (8 keys a row), merged by log-sum-exp, then the dense last rows by one FA3 causal call whose
queries are the last ``n_last`` rows (FA3 aligns a shorter query block's causal mask to the end).

The package is optional: ``systems()`` raises ``ImportError`` with the reason when it cannot load
(its wheel is built for CUDA 12 with its runtime inside; the GPU machine's jax uses CUDA 13). Carry the
wheel and ``einops`` as the device tool's README says. The public ``flash_mha`` returns no
log-sum-exp, so the window call uses the package's forward primitive, which does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def systems(n_init: int, n_local: int, n_last: int) -> list[tuple[str, str, object]]:
    from flash_attn3_jax import flash_mha
    from flash_attn3_jax.flash import _flash_mha_fwd

    def forward(q, k, v, *, causal: bool, window: tuple[int, int]):
        """(out [B, T, H, D], natural-log lse [B, T, H] float32)."""
        out, lse = _flash_mha_fwd(q, k, v, softmax_scale=q.shape[-1] ** -0.5, is_causal=causal, window_size=window)[:2]
        return out, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)

    def triangle(q, k, v):
        b, t, hq, d = q.shape
        out_w, lse_w = forward(q, k, v, causal=True, window=(n_local - 1, 0))
        # sink keys outside each row's window, in XLA
        qg = q.reshape(b, t, k.shape[2], hq // k.shape[2], d).astype(jnp.float32)
        sinks = k[:, :n_init].astype(jnp.float32)
        s = jnp.einsum("bthgd,bjhd->bthgj", qg, sinks) * d ** -0.5
        outside = (jnp.arange(t)[:, None] - jnp.arange(n_init)[None, :]) >= n_local  # [T, n_init]
        s = jnp.where(outside[None, :, None, None, :], s, -jnp.inf)
        lse_s = jax.nn.logsumexp(s, axis=-1)
        safe = jnp.where(jnp.isfinite(lse_s), lse_s, 0.0)
        p = jnp.where(outside[None, :, None, None, :], jnp.exp(s - safe[..., None]), 0.0)
        out_s = jnp.einsum("bthgj,bjhd->bthgd", p, v[:, :n_init].astype(jnp.float32)).reshape(b, t, hq, d)
        lse_s = lse_s.reshape(b, t, hq)
        lse = jnp.logaddexp(lse_w, lse_s)
        band = out_w.astype(jnp.float32) * jnp.exp(lse_w - lse)[..., None] + out_s * jnp.exp(lse_s - lse)[..., None]
        last = flash_mha(q[:, t - n_last:], k, v, is_causal=True)
        return band.astype(q.dtype).at[:, t - n_last:].set(last)

    return [
        ("flash-attn3-jax dense causal", "dense-causal", lambda q, k, v: flash_mha(q, k, v, is_causal=True)),
        ("flash-attn3-jax sliding window only", "band", lambda q, k, v: flash_mha(q, k, v, is_causal=True, window_size=(n_local - 1, 0))),
        ("flash-attn3-jax composed triangle", "triangle", triangle),
    ]
