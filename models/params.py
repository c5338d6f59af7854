"""The weight tree of a decoder, with its config carried along as static pytree data.

Every ``layers`` leaf is stacked over layers on a leading axis, so the decoder loops over a layer
index instead of holding one subtree per layer (the table is in docs/CONTRACTS.md). Each weight is
declared with the logical names of its axes, which the sharding rules map to mesh axes.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight's shape and the logical name of each of its axes (``tmjax.models.sharding.RULES``
    maps logical axes to mesh axes)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]


def weight_specs(config: ModelConfig) -> dict:
    """The weight tree as nested dicts of ``WeightSpec``: shapes and logical axes side by side.

    Logical axes: ``layers`` (the stacked layer axis, never sharded: the decoder indexes it),
    ``vocab``, ``embed`` (hidden size), ``q_heads``, ``kv_heads``, ``head_dim``, ``ffn`` (MLP hidden).
    """
    c = config
    h, num_layers, d = c.hidden_size, c.num_layers, c.head_dim

    def leaf(*dims: tuple[int, str]) -> WeightSpec:
        return WeightSpec(tuple(n for n, _ in dims), tuple(a for _, a in dims))

    layers, embed, head_dim = (num_layers, "layers"), (h, "embed"), (d, "head_dim")

    def proj(heads: int, axis: str) -> dict:
        out = {"kernel": leaf(layers, embed, (heads, axis), head_dim)}
        if c.qkv_bias:
            out["bias"] = leaf(layers, (heads, axis), head_dim)
        return out

    attn = {"q_proj": proj(c.num_heads, "q_heads"), "k_proj": proj(c.num_kv_heads, "kv_heads"),
            "v_proj": proj(c.num_kv_heads, "kv_heads"),
            "o_proj": {"kernel": leaf(layers, (c.num_heads, "q_heads"), head_dim, embed)}}
    if c.o_bias:
        attn["o_proj"]["bias"] = leaf(layers, embed)
    if c.qk_norm:
        attn["q_norm"] = {"scale": leaf(layers, head_dim)}
        attn["k_norm"] = {"scale": leaf(layers, head_dim)}

    ffn = (c.intermediate_size, "ffn")

    def dense(n_in: tuple[int, str], n_out: tuple[int, str]) -> dict:
        out = {"kernel": leaf(layers, n_in, n_out)}
        if c.mlp_bias:
            out["bias"] = leaf(layers, n_out)
        return out

    mlp = {"gate_proj": dense(embed, ffn), "up_proj": dense(embed, ffn), "down_proj": dense(ffn, embed)}
    vocab = (c.vocab_size, "vocab")
    tree = {
        "embed_tokens": {"embedding": leaf(vocab, embed)},
        "layers": {
            "input_layernorm": {"scale": leaf(layers, embed)},
            "self_attn": attn,
            "post_attention_layernorm": {"scale": leaf(layers, embed)},
            "mlp": mlp,
        },
        "norm": {"scale": leaf(embed)},
    }
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"kernel": leaf(embed, vocab)}
    return tree


def is_spec(x: object) -> bool:
    """``is_leaf`` for mapping over ``weight_specs`` trees."""
    return isinstance(x, WeightSpec)


def param_shapes(config: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """The abstract weight tree: nested dicts of ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), weight_specs(config),
                        is_leaf=is_spec)


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
