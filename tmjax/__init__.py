"""tmjax: TriangleMix long-context prefill for JAX."""

from tmjax.attention import causal_attention, triangle_attention
from tmjax.layout import TriangleMix

__all__ = ["TriangleMix", "causal_attention", "triangle_attention"]
