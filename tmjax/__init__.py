"""tmjax: TriangleMix long-context prefill for JAX."""

from tmjax.api import decode_step, generate, prefill
from tmjax.attention import causal_attention, triangle_attention
from tmjax.checkpoint import load
from tmjax.layout import TriangleMix

__all__ = ["TriangleMix", "causal_attention", "decode_step", "generate", "load", "prefill", "triangle_attention"]
