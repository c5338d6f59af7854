"""The weight tree of a decoder, with its config carried along as static pytree data.

Every ``layers`` leaf is stacked over layers on a leading axis, so the decoder loops over a layer
index instead of holding one subtree per layer (the table is in docs/CONTRACTS.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tmjax.models.config import ModelConfig


@struct.dataclass
class Params:
    """``weights`` is the nested dict of arrays; ``config`` is static, so jit specialises on it."""

    config: ModelConfig = struct.field(pytree_node=False)
    weights: dict


def param_shapes(config: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """The abstract weight tree: nested dicts of ``jax.ShapeDtypeStruct``."""
    c = config
    h, num_layers, d = c.hidden_size, c.num_layers, c.head_dim

    def leaf(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    def proj(heads: int) -> dict:
        out = {"kernel": leaf(num_layers, h, heads, d)}
        if c.qkv_bias:
            out["bias"] = leaf(num_layers, heads, d)
        return out

    attn = {"q_proj": proj(c.num_heads), "k_proj": proj(c.num_kv_heads), "v_proj": proj(c.num_kv_heads),
            "o_proj": {"kernel": leaf(num_layers, c.num_heads, d, h)}}
    if c.o_bias:
        attn["o_proj"]["bias"] = leaf(num_layers, h)
    if c.qk_norm:
        attn["q_norm"] = {"scale": leaf(num_layers, d)}
        attn["k_norm"] = {"scale": leaf(num_layers, d)}

    def dense(n_in: int, n_out: int) -> dict:
        out = {"kernel": leaf(num_layers, n_in, n_out)}
        if c.mlp_bias:
            out["bias"] = leaf(num_layers, n_out)
        return out

    mlp = {"gate_proj": dense(h, c.intermediate_size), "up_proj": dense(h, c.intermediate_size),
           "down_proj": dense(c.intermediate_size, h)}
    tree = {
        "embed_tokens": {"embedding": leaf(c.vocab_size, h)},
        "layers": {
            "input_layernorm": {"scale": leaf(num_layers, h)},
            "self_attn": attn,
            "post_attention_layernorm": {"scale": leaf(num_layers, h)},
            "mlp": mlp,
        },
        "norm": {"scale": leaf(h)},
    }
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"kernel": leaf(h, c.vocab_size)}
    return tree


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random weights like transformers' init: norm scales 1, biases 0, the rest N(0, 0.02)."""
    return Params(config, _draw(config, key, jnp.dtype(dtype)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _draw(config: ModelConfig, key: jax.Array, dtype: Any) -> dict:
    """One compiled program for the whole tree (eagerly, every distinct shape would compile)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config, dtype))
    keys = jax.random.split(key, len(paths_leaves))
    leaves = []
    for (path, spec), k in zip(paths_leaves, keys):
        name = path[-1].key
        if name == "scale":
            leaves.append(jnp.ones(spec.shape, spec.dtype))
        elif name == "bias":
            leaves.append(jnp.zeros(spec.shape, spec.dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, spec.shape, jnp.float32)).astype(spec.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
