"""Qwen2 and Qwen3 GGUF files through ``tmjax convert``, against transformers loading the same file.

The files are written with the ``gguf`` package the way llama.cpp's ``convert_hf_to_gguf.py`` lays out
these families: its Qwen2/Qwen3 converters pass q/k rows through unchanged (only its Llama converter
permutes them for interleaved RoPE), norms and biases stay float32, matrices are quantized (Q8_0 here,
so that dequantization runs), and Qwen3's explicit ``head_dim`` goes in ``attention.key_length``.
Truncated and corrupt files must fail with one error line that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize

import hf_fixtures
import tmjax
from tmjax.convert import cli
from tmjax import plan
from tmjax.models.config import ModelConfig

# HF module path -> llama.cpp tensor name
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
FAMILIES = {
    # biases on q/k/v, tied embeddings (Qwen2.5-0.5B's layout: no output.weight)
    "qwen2": dict(tie_word_embeddings=True),
    # q/k-norm, untied head, head_dim 128 != hidden / heads (transformers' GGUF reader assumes 128)
    "qwen3": dict(head_dim=128, tie_word_embeddings=False),
}
THETA = 1e6


def gguf_name(hf_name: str) -> str:
    parts = hf_name.removeprefix("model.").split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
    return {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}[parts[0]] + "." + parts[-1]


def write_llama_cpp_style(model: torch.nn.Module, path: Path, arch: str) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp's converter would for ``arch``; returns the HF state dict as the
    file stores it (matrices after a Q8_0 round trip)."""
    c = model.config
    out = gguf.GGUFWriter(str(path), arch)
    out.add_context_length(c.max_position_embeddings)
    out.add_embedding_length(c.hidden_size)
    out.add_block_count(c.num_hidden_layers)
    out.add_feed_forward_length(c.intermediate_size)
    out.add_head_count(c.num_attention_heads)
    out.add_head_count_kv(c.num_key_value_heads)
    out.add_rope_freq_base(THETA)
    out.add_layer_norm_rms_eps(c.rms_norm_eps)
    out.add_vocab_size(c.vocab_size)
    if arch == "qwen3":
        out.add_key_length(c.head_dim)
        out.add_value_length(c.head_dim)
    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if w.ndim == 2:  # q/k rows as they are: no llama-style permutation for these families
            packed = quantize(w, gguf.GGMLQuantizationType.Q8_0)
            out.add_tensor(gguf_name(name), packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w = dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
        else:
            out.add_tensor(gguf_name(name), w)
        stored[name] = w
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return stored


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """family -> (the .gguf file, the state dict it stores)."""
    out = {}
    for arch, overrides in FAMILIES.items():
        folder = tmp_path_factory.mktemp(arch)
        hf_fixtures.save_tiny_model(folder / "hf", arch, rope_theta=THETA, **overrides)
        model = hf_fixtures.load_hf(folder / "hf")
        out[arch] = (folder / "tiny.gguf", write_llama_cpp_style(model, folder / "tiny.gguf", arch))
    return out


def hf_from_gguf(path: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("arch", FAMILIES)
def test_gguf_logits_match_transformers_reading_the_same_file(files, arch, tmp_path):
    path, stored = files[arch]
    assert cli.main([str(path), str(tmp_path / "ckpt"), "--dtype", "float32", "--quiet"]) == 0
    params = tmjax.load(tmp_path / "ckpt")
    reference = hf_from_gguf(path)
    # the file's q/k rows reach transformers unchanged (it permutes llama's only), and it holds what we wrote
    for name, tensor in reference.state_dict().items():
        if name in stored:
            np.testing.assert_array_equal(tensor.numpy(), stored[name], err_msg=name)
    tokens = np.random.default_rng(0).integers(0, params.config.vocab_size, size=(2, 48)).astype(np.int32)
    ours = jax.jit(plan.full_logits)(params, tokens)
    with torch.no_grad():
        theirs = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    hf_fixtures.assert_close_to_scale(ours, theirs)
    # the config rebuilt from the metadata reads like the one transformers rebuilt from it
    assert params.config == ModelConfig.from_hf(reference.config.to_dict())
    assert params.config.rope.theta == THETA and params.config.architecture == arch


def _truncated_header(data: bytes) -> bytes:
    return data[:40]


def _truncated_tensor_data(data: bytes) -> bytes:
    return data[:-200]


def _bad_magic(data: bytes) -> bytes:
    return b"GGUX" + data[4:]


def _garbage_metadata(data: bytes) -> bytes:
    return data[:24] + bytes(range(256)) * 4 + data[24 + 1024:]


@pytest.mark.parametrize("damage", [_truncated_header, _truncated_tensor_data, _bad_magic, _garbage_metadata],
                         ids=lambda f: f.__name__.strip("_"))
def test_damaged_gguf_fails_with_one_line_naming_the_file(files, damage, tmp_path, capsys):
    path, _ = files["qwen2"]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(damage(path.read_bytes()))
    assert cli.main([str(broken), str(tmp_path / "dst"), "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmjax convert: error:") and str(broken) in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["broken.gguf"]
