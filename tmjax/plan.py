"""The layer plan: a layout -> the attention each decoder layer runs in prefill, as runs of layers.

``layer_runs`` turns a layout (``tmjax.layout``) and a model's sliding windows into runs ``(start,
stop, attend)`` of consecutive layers that attend alike; ``attend(layer, q, k, v, length)`` is a
``LayerAttention`` (hashable, so a plan can be a static argument of ``jit``). The decoder
(``tmjax.models.decoder.prefill_hidden``) runs whatever runs it is given and knows nothing of
layouts; a hook of the same signature over all layers (``[(0, L, fn)]``) replaces every layer's
attention (tests, probes). ``check_windows`` is the host-side rule for sparse layers on windowed ones,
which the public API applies once, with ``layout.check_layers``, before anything is traced.
"""

from __future__ import annotations

import dataclasses

import jax

from tmjax import attention
from tmjax.layout import FlexPrefill, Layout, TriangleMix, VerticalSlash
from tmjax.models import decoder
from tmjax.models.config import ModelConfig
from tmjax.models.params import Params

KINDS = ("causal", "window", "triangle", "vertical_slash", "flexprefill")


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """How a layer attends in prefill: ``causal``, ``window`` (sliding window), ``triangle``,
    ``vertical_slash`` or ``flexprefill`` (``pattern`` holds its budgets or options), on ``implementation`` (None: the platform's).
    Called as ``attend(layer, q, k, v, length)`` (the layer index is unused: the run decides)."""

    kind: str
    window: int = 0
    n_init: int = 0
    n_local: int = 0
    n_last: int = 0
    pattern: VerticalSlash | FlexPrefill | None = None
    implementation: str | None = None

    def __call__(self, layer: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array) -> jax.Array:
        impl = self.implementation
        if self.kind == "triangle":
            return attention.triangle_attention(q, k, v, n_init=self.n_init, n_local=self.n_local, n_last=self.n_last,
                                                length=length, implementation=impl)
        if self.kind == "vertical_slash":
            return attention.vertical_slash(q, k, v, self.pattern, length=length, implementation=impl)
        if self.kind == "flexprefill":
            return attention.flexprefill_attention(q, k, v, self.pattern, length=length, implementation=impl)
        if self.kind == "window":  # a window is a triangle without sinks or dense rows
            return attention.triangle_attention(q, k, v, n_init=0, n_local=self.window, n_last=0, length=length,
                                                implementation=impl)
        return attention.causal_attention(q, k, v, length=length, implementation=impl)


Run = tuple[int, int, decoder.AttentionFn]


def layer_runs(config: ModelConfig, layout: Layout | None, seq_len: int, implementation: str | None = None
               ) -> tuple[Run, ...]:
    """Runs ``(start, stop, attend)`` of consecutive layers that attend alike, for a padded length ``seq_len``.

    A window of at least ``seq_len`` hides nothing and counts as causal. A Triangle, vertical-slash or
    FlexPrefill layer ignores its sliding window: ``check_windows`` has made sure, on the true prompt lengths,
    that the window hides nothing there (the plan is static per bucket and cannot see those lengths).
    The layout is taken as valid (the API checked it).
    """
    kinds = []
    for layer in range(config.num_layers):
        window = config.layer_window(layer)
        if window is not None and window >= seq_len:
            window = None
        sparse = None if layout is None else layout.attention_at(layer)
        if isinstance(sparse, TriangleMix):
            how = LayerAttention("triangle", n_init=sparse.n_init, n_local=sparse.n_local, n_last=sparse.n_last)
        elif isinstance(sparse, VerticalSlash):
            how = LayerAttention("vertical_slash", pattern=sparse)
        elif isinstance(sparse, FlexPrefill):
            how = LayerAttention("flexprefill", pattern=sparse)
        elif window is not None:
            how = LayerAttention("window", window=window)
        else:
            how = LayerAttention("causal")
        kinds.append(dataclasses.replace(how, implementation=implementation))
    runs: list[Run] = []
    for layer, how in enumerate(kinds):
        if runs and runs[-1][2] == how:
            runs[-1] = (runs[-1][0], layer + 1, how)
        else:
            runs.append((layer, layer + 1, how))
    return tuple(runs)


def check_windows(config: ModelConfig, layout: Layout | None, longest: int) -> None:
    """Raise ``ValueError`` if a sparse-layout layer (Triangle, vertical-slash, FlexPrefill) has a sliding
    window shorter than the longest true prompt length ``longest``.

    The intersection of a window with those patterns is neither of them, and dropping either would
    change the model. A window of at least the prompt length hides nothing in prefill (a real row
    ``i < length <= window`` sees every earlier key), so the pattern alone is exact there; padding
    rows do not count.
    """
    if layout is None:
        return
    for layer in range(config.num_layers):
        window, sparse = config.layer_window(layer), layout.attention_at(layer)
        if window is not None and window < longest and sparse is not None:
            name = {TriangleMix: "Triangle", VerticalSlash: "vertical-slash", FlexPrefill: "FlexPrefill"}[type(sparse)]
            raise ValueError(
                f"layer {layer} has a sliding window of {window} < the prompt length {longest} and is a {name} "
                f"layer; sparse layouts on a windowed layer take prompts of at most {window} tokens"
            )


def full_logits(
    params: Params,
    tokens: jax.Array,
    layout: Layout | None = None,
    *,
    implementation: str | None = None,
    attention_fn: decoder.AttentionFn | None = None,
) -> jax.Array:
    """float32 logits ``[B, T, V]`` of every position of an unpadded prompt under ``layout`` (or with
    ``attention_fn`` in every layer), for tests; the public prefill only computes the last position's."""
    c = params.config
    if attention_fn is not None:
        runs: tuple[Run, ...] = ((0, c.num_layers, attention_fn),)
    else:
        runs = layer_runs(c, layout, tokens.shape[1], implementation)
    hidden, _ = decoder.prefill_hidden(params, tokens, tokens.shape[1], runs=runs)
    return decoder.logits(params, hidden)
