"""Prefill never materialises ``[B, T, V]`` logits: a bound on the compiled program's temporary memory.

The program is compiled for abstract weights (nothing is allocated), and XLA's own memory analysis
says how many bytes of temporaries it needs. The vocabulary is large next to every other activation
(V = 32768 against hidden 64), so full-sequence float32 logits (``B * T * V * 4`` bytes, 128 MiB per
row of the batch at T = 1024) would dwarf the rest; today's program needs 8.4 MiB dense and 14.5 MiB
with TriangleMix at B = 2 (jax 0.10.2, CPU). The bound is an eighth of the full logits (32 MiB).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from tmjax import api
from tmjax.layout import TriangleMix
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes

VOCAB, T = 32768, 1024
CONFIG = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)


def prefill_temp_bytes(batch: int, layout: TriangleMix | None, vocab: int = VOCAB) -> int:
    """Temporary bytes of the compiled program behind ``tmjax.prefill`` for a ``[batch, T]`` prompt.

    ``tmjax.prefill`` validates and pads on the host, then calls one jitted function; that function
    is what is compiled here, with the arguments ``prefill`` gives it (``api._prefill`` is the only
    handle on it)."""
    config = dataclasses.replace(CONFIG, vocab_size=vocab)
    params = Params(config, param_shapes(config, jnp.float32))
    tokens = jax.ShapeDtypeStruct((batch, T), jnp.int32)
    length = jax.ShapeDtypeStruct((batch,), jnp.int32)  # one length per row
    compiled = api._prefill.lower(params, tokens, length, layout, None, T + 128, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("layout", [None, TriangleMix(switch_layer=1, n_init=4, n_local=64, n_last=32)],
                         ids=["dense", "trianglemix"])
def test_prefill_temporaries_stay_far_below_full_logits(layout):
    batch = 2
    full_logits = batch * T * VOCAB * 4
    temp = prefill_temp_bytes(batch, layout)
    assert temp < full_logits / 8, (
        f"prefill needs {temp / 2**20:.1f} MiB of temporaries; [B, T, V] float32 logits are "
        f"{full_logits / 2**20:.0f} MiB: is every position's logits computed?")
    # and doubling V adds far less than another B * T * V * 4 bytes (only the last row's logits grow)
    grown = prefill_temp_bytes(batch, layout, vocab=2 * VOCAB) - temp
    assert grown < full_logits / 8, f"doubling the vocabulary added {grown / 2**20:.1f} MiB of temporaries"
