"""Hugging Face tensor names -> tmjax weight tree, with the reshape each tensor needs.

The table is data so that the converter, the tests and any future source format (safetensors, GGUF,
a live ``state_dict``) share one definition of the layout. Per-layer tensors are written into a
preallocated ``[L, ...]`` array one layer at a time, so building the tree holds the target tree plus
one source tensor (and its reshaped copy) at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from tmjax.models.config import ModelConfig

Shape = tuple[int, ...]
# Source dtypes a weight may have: anything else (ints, bools, float8 without its scales) is refused
# rather than cast, since a cast would silently give a different model.
FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))


def _copy(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w


def _linear(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """torch Linear ``[out, in]`` -> ``[in, out]``."""
    return w.T


def _q_in(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """``[Hq*D, H]`` -> ``[H, Hq, D]``."""
    return w.T.reshape(c.hidden_size, c.num_heads, c.head_dim)


def _kv_in(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """``[Hkv*D, H]`` -> ``[H, Hkv, D]``."""
    return w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)


def _q_bias(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w.reshape(c.num_heads, c.head_dim)


def _kv_bias(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w.reshape(c.num_kv_heads, c.head_dim)


def _o_out(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """``[H, Hq*D]`` -> ``[Hq, D, H]``."""
    return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _always(c: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: its name (``{i}`` = layer index), our path, expected HF shape, transform."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: Callable[[ModelConfig], Shape]
    transform: Callable[[np.ndarray, ModelConfig], np.ndarray]
    present: Callable[[ModelConfig], bool] = _always

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


_L = "model.layers.{i}."
_ATT = ("layers", "self_attn")
_MLP = ("layers", "mlp")

TABLE: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"),
          lambda c: (c.vocab_size, c.hidden_size), _copy),
    Entry(_L + "input_layernorm.weight", ("layers", "input_layernorm", "scale"),
          lambda c: (c.hidden_size,), _copy),
    Entry(_L + "self_attn.q_proj.weight", _ATT + ("q_proj", "kernel"),
          lambda c: (c.num_heads * c.head_dim, c.hidden_size), _q_in),
    Entry(_L + "self_attn.k_proj.weight", _ATT + ("k_proj", "kernel"),
          lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), _kv_in),
    Entry(_L + "self_attn.v_proj.weight", _ATT + ("v_proj", "kernel"),
          lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), _kv_in),
    Entry(_L + "self_attn.q_proj.bias", _ATT + ("q_proj", "bias"),
          lambda c: (c.num_heads * c.head_dim,), _q_bias, lambda c: c.qkv_bias),
    Entry(_L + "self_attn.k_proj.bias", _ATT + ("k_proj", "bias"),
          lambda c: (c.num_kv_heads * c.head_dim,), _kv_bias, lambda c: c.qkv_bias),
    Entry(_L + "self_attn.v_proj.bias", _ATT + ("v_proj", "bias"),
          lambda c: (c.num_kv_heads * c.head_dim,), _kv_bias, lambda c: c.qkv_bias),
    Entry(_L + "self_attn.o_proj.weight", _ATT + ("o_proj", "kernel"),
          lambda c: (c.hidden_size, c.num_heads * c.head_dim), _o_out),
    Entry(_L + "self_attn.o_proj.bias", _ATT + ("o_proj", "bias"),
          lambda c: (c.hidden_size,), _copy, lambda c: c.o_bias),
    Entry(_L + "self_attn.q_norm.weight", _ATT + ("q_norm", "scale"),
          lambda c: (c.head_dim,), _copy, lambda c: c.qk_norm),
    Entry(_L + "self_attn.k_norm.weight", _ATT + ("k_norm", "scale"),
          lambda c: (c.head_dim,), _copy, lambda c: c.qk_norm),
    Entry(_L + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"),
          lambda c: (c.hidden_size,), _copy),
    Entry(_L + "mlp.gate_proj.weight", _MLP + ("gate_proj", "kernel"),
          lambda c: (c.intermediate_size, c.hidden_size), _linear),
    Entry(_L + "mlp.up_proj.weight", _MLP + ("up_proj", "kernel"),
          lambda c: (c.intermediate_size, c.hidden_size), _linear),
    Entry(_L + "mlp.gate_proj.bias", _MLP + ("gate_proj", "bias"),
          lambda c: (c.intermediate_size,), _copy, lambda c: c.mlp_bias),
    Entry(_L + "mlp.up_proj.bias", _MLP + ("up_proj", "bias"),
          lambda c: (c.intermediate_size,), _copy, lambda c: c.mlp_bias),
    Entry(_L + "mlp.down_proj.weight", _MLP + ("down_proj", "kernel"),
          lambda c: (c.hidden_size, c.intermediate_size), _linear),
    Entry(_L + "mlp.down_proj.bias", _MLP + ("down_proj", "bias"),
          lambda c: (c.hidden_size,), _copy, lambda c: c.mlp_bias),
    Entry("model.norm.weight", ("norm", "scale"), lambda c: (c.hidden_size,), _copy),
    Entry("lm_head.weight", ("lm_head", "kernel"),
          lambda c: (c.vocab_size, c.hidden_size), _linear, lambda c: not c.tie_word_embeddings),
)

# RoPE caches some older checkpoints carry: recomputed from the config, so skipped. (A duplicate
# lm_head saved next to tied embeddings is skipped too, in unexpected_hf_names.)
_IGNORABLE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def entries(config: ModelConfig) -> list[Entry]:
    """The table rows that exist for ``config``."""
    return [e for e in TABLE if e.present(config)]


def expected_hf_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name the model of ``config`` needs, in conversion order."""
    names = []
    for e in entries(config):
        if e.per_layer:
            names.extend(e.hf_name.format(i=i) for i in range(config.num_layers))
        else:
            names.append(e.hf_name)
    return names


def unexpected_hf_names(config: ModelConfig, names: Iterable[str]) -> list[str]:
    """Names in a source that the model of ``config`` has no place for (harmless extras excluded)."""
    wanted = set(expected_hf_names(config))
    extra = []
    for name in names:
        if name in wanted or _IGNORABLE.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        extra.append(name)
    return sorted(extra)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _fetch(config: ModelConfig, entry: Entry, name: str,
           get_tensor: Callable[[str], np.ndarray]) -> np.ndarray:
    try:
        w = get_tensor(name)
    except KeyError:
        raise ValueError(f"missing tensor {name!r}") from None
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {w.dtype}; weights must be float16, bfloat16, float32 or "
                         "float64 (fix or re-export the source)")
    want = entry.hf_shape(config)
    if tuple(w.shape) != want:
        raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {want}")
    return entry.transform(w, config)


def weights_from_hf(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    dtype: Any,
    *,
    on_tensor: Callable[[str], None] | None = None,
) -> dict:
    """Build the nested weight tree (numpy arrays of ``dtype``) from an HF name -> array lookup.

    ``get_tensor`` is called once per name and should raise ``KeyError`` for a missing name; its
    result may be dropped right after it is copied in, which keeps memory at one source tensor.
    ``on_tensor(name)`` is called after each tensor (progress reporting).
    """
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tree: dict = {}
    for entry in entries(config):
        if not entry.per_layer:
            out = np.asarray(_fetch(config, entry, entry.hf_name, get_tensor), dtype=dtype)
            _set(tree, entry.path, np.ascontiguousarray(out))
            if on_tensor is not None:
                on_tensor(entry.hf_name)
            continue
        stacked = None
        for i in range(config.num_layers):
            name = entry.hf_name.format(i=i)
            w = _fetch(config, entry, name, get_tensor)
            if stacked is None:
                stacked = np.empty((config.num_layers,) + w.shape, dtype=dtype)
            stacked[i] = w
            del w
            if on_tensor is not None:
                on_tensor(name)
        _set(tree, entry.path, stacked)
    return tree
