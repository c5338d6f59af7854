"""The real SmolLM2-135M-Instruct GGUF, converted by ``tmjax convert``, against transformers' own
GGUF loader: same tokenizer ids, close next-token logits, same greedy continuation."""

from __future__ import annotations

from pathlib import Path

import chex
import numpy as np
import pytest
import torch

import tmjax.checkpoint as ckpt
from tmjax.api import generate, prefill
from tmjax.convert.cli import main as convert_main
from tmjax.default_model import smollm2_gguf

PROMPTS = ("What is the capital of France?", "Name three colors.", "Write a haiku about the sea.")
NEW_TOKENS = 8


def _gguf() -> Path:
    try:
        return smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert convert_main([str(_gguf()), str(dst), "--dtype", "float32", "--quiet"]) == 0
    return dst


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_config_and_tokenizer_match_transformers(converted, hf):
    model, hf_tok = hf
    config = ckpt.read_config(converted)
    hc = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size, config.tie_word_embeddings) == (
        hc.num_hidden_layers, hc.hidden_size, hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim,
        hc.vocab_size, hc.tie_word_embeddings)
    assert config.rope.theta == hc.rope_parameters["rope_theta"]
    ours = ckpt.tokenizer(converted)
    for prompt in PROMPTS:
        assert _chat_ids(ours, prompt) == _chat_ids(hf_tok, prompt)


def test_logits_and_greedy_continuation_match_transformers(converted, hf):
    model, hf_tok = hf
    params = ckpt.load(converted)
    tokenizer = ckpt.tokenizer(converted)
    eos = tokenizer.eos_token_id
    answers = []
    for prompt in PROMPTS:
        ids = _chat_ids(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos, output_logits=True, return_dict_in_generate=True)
        ref_logits = out.logits[0][0].numpy()  # the raw logits after the prompt
        ref = out.sequences[0, len(ids):].tolist()
        logits, _ = prefill(params, np.asarray(ids, np.int32))
        chex.assert_trees_all_close(np.asarray(logits), ref_logits, atol=2e-3, rtol=1e-4)
        ours = np.asarray(generate(params, np.asarray(ids, np.int32), NEW_TOKENS, eos_token_id=eos)).tolist()
        assert ours[: len(ref)] == ref, (prompt, tokenizer.decode(ours), tokenizer.decode(ref))
        assert all(t == eos for t in ours[len(ref):])
        answers.append(tokenizer.decode(ours))
    # both could be wrong the same way (e.g. a shared tokenizer bug): the known answer guards that
    assert "Paris" in answers[0], answers[0]
