"""Inputs shared by the attention test files."""

import jax.numpy as jnp
import numpy as np


def random_qkv(seed: int, batch: int, seq_len: int, q_heads: int, kv_heads: int, head_dim: int, dtype
               ) -> list[jnp.ndarray]:
    """Standard-normal q ``[B, T, Hq, D]`` and k, v ``[B, T, Hkv, D]`` in ``dtype`` (never zeros: they hide
    unwritten outputs and wrong indexing)."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq_len, q_heads, head_dim)] + [(batch, seq_len, kv_heads, head_dim)] * 2
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype) for s in shapes]
