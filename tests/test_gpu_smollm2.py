"""On a GPU, TriangleMix prefill through the platform's Pallas kernel continues SmolLM2 exactly like
the portable XLA path (same greedy tokens). Skipped without a CUDA GPU."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import tmjax
from tmjax.checkpoint import tokenizer as load_tokenizer
from tmjax.default_model import smollm2_checkpoint
from tmjax.demo import build_prompt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (Pallas GPU kernels)"),
]

QUESTIONS = ["What is the capital of France?", "Write one sentence about the ocean."]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_checkpoint("bfloat16")
    return tmjax.load(path), load_tokenizer(path)


def _prompts(tok) -> list[np.ndarray]:
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    texts += [build_prompt(tok, n, depth=0.4, seed=n)[0] for n in (1500, 4000)]
    return [np.asarray(tok.encode(t, add_special_tokens=False), np.int32) for t in texts]


def test_triangle_prefill_on_gpu_matches_the_xla_path(smollm2):
    params, tok = smollm2
    layout = tmjax.TriangleMix(15, n_init=8, n_local=256, n_last=64)  # small window: the triangle matters
    rows = []
    for tokens in _prompts(tok):
        kernel = np.asarray(tmjax.generate(params, tokens, 12, layout))
        xla = np.asarray(tmjax.generate(params, tokens, 12, layout, implementation="xla"))
        dense = np.asarray(tmjax.generate(params, tokens, 12))
        rows.append(dict(prompt_tokens=len(tokens), kernel=tok.decode(kernel), xla=tok.decode(xla),
                         dense=tok.decode(dense), kernel_equals_xla=bool((kernel == xla).all()),
                         triangle_equals_dense=bool((kernel == dense).all())))
    if os.environ.get("TMJAX_GPU_RESULTS"):
        with open(os.environ["TMJAX_GPU_RESULTS"], "w") as fh:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), fh, indent=1)
    for row in rows:
        assert row["kernel_equals_xla"], row
