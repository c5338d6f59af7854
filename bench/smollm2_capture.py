"""SmolLM2-135M-Instruct on the demo's haystack prompt, for the benchmarks that need real attention
structure: the model, the prompt's tokens at a length, and ``capture``, a dense prefill with a hook that
copies the chosen layers' q, k, v (after RoPE) to the host (``dynamic_layer.py``, ``fp8_cache_error.py``;
``ttft.py``, ``smollm2_vs_indices.py`` and ``vs_selection.py`` take the model and the tokens)."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

import tmjax
from tmjax.checkpoint import tokenizer as load_tokenizer
from tmjax.default_model import smollm2_checkpoint
from tmjax.demo import build_prompt
from tmjax.models import decoder
from tmjax.models.params import Params


def smollm2(dtype: str = "float32") -> tuple[Params, object]:
    """(params, tokenizer) of the default model in ``dtype`` (converted on first use)."""
    path = smollm2_checkpoint(dtype)
    return tmjax.load(path), load_tokenizer(path)


def haystack_tokens(tokenizer: object, length: int, seed: int | None = None) -> np.ndarray:
    """int32 ``[1, length]``: the haystack prompt (passkey at half depth; ``seed`` default ``length``)."""
    text = build_prompt(tokenizer, length + 64, depth=0.5, seed=length if seed is None else seed)[0]
    return np.asarray(tokenizer.encode(text, add_special_tokens=False)[:length], np.int32)[None]


def capture(length: int, layers: Iterable[int] | None = None, *, seed: int | None = None,
            dtype: str = "float32") -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Layer -> (q, k, v) numpy ``[1, length, heads, 64]`` for ``layers`` (default all), from the
    ``dtype`` checkpoint on the haystack prompt of ``length`` tokens (``seed`` as ``haystack_tokens``)."""
    params, tok = smollm2(dtype)
    tokens = haystack_tokens(tok, length, seed)
    wanted = set(range(params.config.num_layers) if layers is None else layers)
    found: dict = {}

    def keep(at, q, k, v) -> None:
        if int(at) in wanted:
            found[int(at)] = tuple(np.asarray(x) for x in (q, k, v))

    def hook(at, q, k, v, n):
        jax.debug.callback(keep, at, q, k, v)
        return tmjax.causal_attention(q, k, v, length=n)

    every_layer = ((0, params.config.num_layers, hook),)
    run = jax.jit(lambda p, t: decoder.prefill_hidden(p, t, t.shape[1], runs=every_layer)[0][:, -1])
    jax.block_until_ready(run(params, tokens))
    return found
