"""Tiny random transformers models, saved to a folder and loaded back, for tests that compare against them.

transformers' default init (std 0.02, norms 1) gives near-uniform logits that a wrong port can still
match, so every parameter is re-drawn large: norm weights N(1, 0.3), everything else N(0, 0.15).
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable

import chex
import numpy as np
import torch
import transformers

from tmjax.convert.mapping import weights_from_hf
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)


def save_tiny_model(path: pathlib.Path, family: str, seed: int = 0, **overrides: object) -> pathlib.Path:
    """Build a tiny ``family`` model (``TINY`` updated by ``overrides``), re-draw its weights, save it."""
    config_cls, model_cls = _CLASSES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return path


def tiny_models(tmp_path_factory: object, specs: dict[str, tuple[str, dict]]
                ) -> Callable[[str], tuple[pathlib.Path, Params]]:
    """A cached builder for a test module's fixture: ``name -> (saved folder, our Params)`` of the tiny
    model ``specs[name] = (family, overrides)``, saved once under pytest's ``tmp_path_factory``."""

    @functools.cache
    def build(name: str) -> tuple[pathlib.Path, Params]:
        family, overrides = specs[name]
        path = save_tiny_model(tmp_path_factory.mktemp(name), family, **overrides)
        return path, load_tmjax(path)

    return build


def load_hf(path: pathlib.Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A fresh eager copy (fresh matters: dynamic RoPE keeps state between forwards)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


def hf_config(path: pathlib.Path) -> dict:
    return json.loads((path / "config.json").read_text())


def load_tmjax(path: pathlib.Path) -> Params:
    """Our params for the saved model: its config.json and its ``state_dict`` through the converter's table."""
    config = ModelConfig.from_hf(hf_config(path))
    state = load_hf(path).state_dict()
    weights = weights_from_hf(config, lambda name: state[name].numpy(), np.float32)
    return Params(config, weights)


def hf_logits(path: pathlib.Path, tokens: np.ndarray, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """transformers' logits ``[B, T, V]`` for the whole sequence in one forward, as float32 numpy
    (a ``dtype`` model's logits are in that dtype: bfloat16 ones are bfloat16-rounded)."""
    with torch.no_grad():
        return load_hf(path, dtype)(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_cached_logits(path: pathlib.Path, tokens: np.ndarray, prompt_len: int) -> np.ndarray:
    """transformers' logits from a prefill of ``prompt_len`` tokens then one cached step per token:
    ``[B, T - prompt_len + 1, V]`` (the prompt's last position first)."""
    model = load_hf(path)
    ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = model(ids[:, :prompt_len], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(prompt_len, tokens.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1).numpy()


def assert_close_to_scale(ours: object, reference: np.ndarray, tol: float = 1e-4) -> None:
    """``max |ours - reference| <= tol * max |reference|`` (and equal shapes)."""
    reference = np.asarray(reference, np.float32)
    chex.assert_trees_all_close(np.asarray(ours, np.float32), reference, rtol=0.0,
                                atol=tol * float(np.max(np.abs(reference))))
