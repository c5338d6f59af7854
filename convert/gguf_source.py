"""Read a GGUF file (llama.cpp) as if it were a Hugging Face checkpoint.

Tensors are memory-mapped by ``gguf.GGUFReader`` and dequantized one at a time under their HF
names; the HF ``config.json`` is rebuilt from the GGUF metadata. llama.cpp stores the q/k rows of
Llama-architecture models permuted for interleaved RoPE; they are put back in HF's half-split order.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# GGUF architecture -> (HF model_type, HF architectures entry, q/k rows permuted by llama.cpp).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}

# GGUF tensor name -> HF tensor name; "{i}" is the layer index.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
# GGML types that hold integers, not (quantized) floats.
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")
_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in _NAMES.items()
]


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when it has no HF counterpart we know."""
    for pattern, hf in _PATTERNS:
        match = pattern.match(gguf_name)
        if match:
            return hf.format(i=match.group(1)) if match.groups() else hf
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order of a q/k weight ``[out, in]`` or bias ``[out]``."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows over {n_head} heads (not a multiple of 2*heads)")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(contextlib.AbstractContextManager):
    """A GGUF file: an HF-style ``config.json`` dict and an HF-name -> float32 array lookup."""

    FORMAT = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._reader = GGUFReader(str(self.path))
        except FileNotFoundError:
            raise ValueError(f"{self.path} is missing") from None
        except (ValueError, OSError, IndexError, KeyError) as err:
            raise ValueError(f"{self.path} is not a readable GGUF file: {err}") from None
        self._tensors: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                raise ValueError(f"{self.path}: tensor {tensor.name!r} has no Hugging Face counterpart")
            self._tensors[name] = tensor
        self.hf_config: dict = self._build_config()

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _build_config(self) -> dict:
        arch = self._field("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {arch!r} is not supported (supported: "
                f"{', '.join(ARCHITECTURES)})"
            )
        model_type, hf_class, self._permuted = ARCHITECTURES[arch]

        def need(key: str) -> Any:
            value = self._field(f"{arch}.{key}")
            if value is None:
                raise ValueError(f"{self.path}: GGUF metadata lacks {arch}.{key}")
            return value

        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        head_dim = int(self._field(f"{arch}.attention.key_length", hidden // heads))
        rope_dim = int(self._field(f"{arch}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ValueError(f"{self.path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
        scaling = self._field(f"{arch}.rope.scaling.type", "none")
        rope = {"rope_type": "default", "rope_theta": float(self._field(f"{arch}.rope.freq_base", 10000.0))}
        if scaling == "linear":
            rope.update(rope_type="linear", factor=float(need("rope.scaling.factor")))
        elif scaling != "none":
            raise ValueError(f"{self.path}: GGUF RoPE scaling {scaling!r} is not supported")
        vocab = self._field(f"{arch}.vocab_size")
        if vocab is None:
            if "model.embed_tokens.weight" not in self._tensors:
                raise ValueError(f"{self.path}: no token_embd.weight tensor (the token embedding) and no "
                                 f"{arch}.vocab_size metadata; the file is incomplete")
            vocab = self._tensors["model.embed_tokens.weight"].shape[-1]
        config = {
            "architectures": [hf_class],
            "model_type": model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(need("feed_forward_length")),
            "num_hidden_layers": int(need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{arch}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(need("context_length")),
            "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
            "rope_parameters": rope,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        if model_type == "llama":
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            config["mlp_bias"] = "model.layers.0.mlp.gate_proj.bias" in self._tensors
        for key in ("bos", "eos", "padding"):
            token = self._field(f"tokenizer.ggml.{key}_token_id")
            if token is not None:
                config[f"{'pad' if key == 'padding' else key}_token_id"] = int(token)
        return config

    def names(self) -> list[str]:
        """Every tensor, by HF name."""
        return list(self._tensors)

    def get_tensor(self, name: str) -> np.ndarray:
        """One tensor, dequantized to float32 in HF layout; ``KeyError`` if absent."""
        tensor = self._tensors[name]
        if tensor.tensor_type.name in _INTEGER_TYPES:
            raise ValueError(f"{self.path}: tensor {tensor.name!r} holds {tensor.tensor_type.name} integers; "
                             "weights must be float or quantized float")
        # Read with a plain file read rather than through the reader's memory map, whose pages
        # would stay resident (counted in RSS) after use.
        raw = np.fromfile(self.path, np.uint8, count=int(tensor.n_bytes), offset=int(tensor.data_offset))
        try:
            w = dequantize(raw.view(tensor.data.dtype).reshape(tensor.data.shape), tensor.tensor_type)
        except (ValueError, NotImplementedError) as err:
            raise ValueError(f"{self.path}: cannot dequantize {tensor.name!r}: {err}") from None
        if self._permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, self.hf_config["num_attention_heads"])
        elif self._permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, self.hf_config["num_key_value_heads"])
        return w

    def write_side_files(self, folder: Path) -> None:
        """Rebuild the tokenizer (if the file has one) with transformers' GGUF reader, save it here."""
        if "tokenizer.ggml.model" not in self._reader.fields:
            return
        from transformers import AutoTokenizer  # deferred: only needed for this step

        tokenizer = AutoTokenizer.from_pretrained(
            str(self.path.parent), gguf_file=self.path.name, local_files_only=True
        )
        tokenizer.save_pretrained(str(folder))

    def __exit__(self, *exc: object) -> None:
        # The reader and its tensors hold a numpy memmap of the file; dropping them releases it.
        self._tensors = {}
        self._reader = None
