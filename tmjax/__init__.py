"""tmjax: TriangleMix long-context prefill for JAX.

The API and the submodules are imported on first use (PEP 562 ``__getattr__``), so that the ``tmjax``
command's ``--help`` and ``--version`` import no jax.
"""

import importlib
import importlib.metadata
import importlib.util

from tmjax.layout import FlexPrefill, TriangleMix, VerticalSlash

try:
    __version__ = importlib.metadata.version("tmjax")  # one source of truth: pyproject.toml
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_API = {"decode_step": "tmjax.api", "generate": "tmjax.api", "prefill": "tmjax.api", "load": "tmjax.checkpoint",
        "memory_estimate": "tmjax.memory",
        **{name: "tmjax.attention" for name in ("causal_attention", "flexprefill_attention", "triangle_attention", "vertical_slash_attention",
                                                 "vertical_slash_indices")}}

__all__ = [
    "FlexPrefill", "TriangleMix", "VerticalSlash", "causal_attention", "decode_step", "flexprefill_attention", "generate", "load", "memory_estimate", "prefill", "triangle_attention",
    "vertical_slash_attention", "vertical_slash_indices",
]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. tmjax.checkpoint
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
