"""tmjax: TriangleMix long-context prefill for JAX."""

from tmjax.api import decode_step, generate, prefill
from tmjax.attention import causal_attention, triangle_attention, vertical_slash_attention, vertical_slash_indices
from tmjax.checkpoint import load
from tmjax.layout import TriangleMix, VerticalSlash

__all__ = [
    "TriangleMix", "VerticalSlash", "causal_attention", "decode_step", "generate", "load", "prefill", "triangle_attention",
    "vertical_slash_attention", "vertical_slash_indices",
]
