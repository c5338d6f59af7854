"""Public attention entry points; each backend is one module of ``tmjax.pallas_kernels``.

The stack has three stages: a layout (``TriangleMix`` sizes, ``VerticalSlash`` budgets) -> block
tables (static: ``block_tables``, built at trace time; dynamic: ``vs_estimate`` picks columns and
diagonals on device, ``dynamic_tables`` turns them into per-query-block lists) -> one kernel per
backend. A backend module exposes ``triangle_attention(q, k, v, *, n_init, n_local, n_last, length)``,
``causal_attention(q, k, v, *, length)`` and ``vertical_slash_attention(q, k, v, *, columns,
diagonals, length)``. Backends are imported lazily so that a CPU install never imports GPU-only code.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from tmjax.layout import VerticalSlash

IMPLEMENTATIONS = ("xla", "triton", "mosaic_gpu", "tpu")
# Vertical-slash kernels not yet run on their hardware: the tpu kernel passes in the CPU interpreter
# only (mosaic_gpu and triton passed tests/test_gpu.py on an H100, 2026-11-23), so implementation=None
# keeps vertical-slash on xla on a TPU; naming it runs it.
_VS_NOT_YET_ON_HARDWARE = ("tpu",)


def default_implementation() -> str:
    """The backend ``implementation=None`` picks: Hopper -> mosaic_gpu, other CUDA -> triton,
    TPU -> tpu, anything else -> xla."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        capability = getattr(device, "compute_capability", "0.0")
        major = int(str(capability).split(".")[0])
        return "mosaic_gpu" if major == 9 else "triton"
    if device.platform == "tpu":
        return "tpu"
    return "xla"


def _resolve(implementation: str | None, q: jax.Array) -> str:
    """The backend to run: the named one, else the platform default, falling back to xla for inputs
    the Pallas kernels do not take (dtypes other than bf16/fp16, head dims other than 64/128)."""
    if implementation is not None:
        return implementation
    name = default_implementation()
    if name != "xla" and not _pallas_takes(q):
        return "xla"
    return name


def _pallas_takes(q: jax.Array) -> bool:
    from tmjax.pallas_kernels import _common

    return jnp.dtype(q.dtype) in _common.SUPPORTED_DTYPES and q.shape[-1] in _common.SUPPORTED_HEAD_DIMS


def _cudnn_takes(q: jax.Array) -> bool:
    """Whether ``implementation=None`` sends dense causal attention to cuDNN (GPU, bf16/fp16)."""
    return (
        jax.devices()[0].platform == "gpu"
        and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )


def _backend(name: str) -> ModuleType:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS} or None")
    return importlib.import_module(f"tmjax.pallas_kernels.{name}")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(f"{name} must be a jax or numpy array [B, T, H, D], got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"q, k, v must not be empty (T = 0 or another axis of size 0); got shapes {q.shape}, {k.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, length or head_dim")
    if hq % k.shape[2]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[2]})")


def triangle_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    n_init: int = 8,
    n_local: int = 512,
    n_last: int = 128,
    length: int | jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Triangle attention (sinks + local window + dense last rows), softmax scale ``D ** -0.5``.

    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: KV head j serves query
    heads ``[j*g, (j+1)*g)``). ``length`` (static int or traced int32 scalar, default T) is the true
    sequence length when the inputs are right-padded: the dense rows are ``[length - n_last, length)``
    and output rows at or beyond ``length`` are unspecified. Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    _check_shapes(q, k, v)
    for name, value, low in (("n_init", n_init, 0), ("n_local", n_local, 1), ("n_last", n_last, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int (the layout is static), got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    return _backend(_resolve(implementation, q)).triangle_attention(
        q, k, v, n_init=n_init, n_local=n_local, n_last=n_last, length=length
    )


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    length: int | jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Dense causal attention with the same layout, dtype and ``length`` rules as ``triangle_attention``.

    ``implementation=None`` on a GPU with bf16/fp16 inputs uses cuDNN
    (``jax.nn.dot_product_attention(implementation="cudnn")``); our causal-table kernels stay
    available by name. Right padding needs no mask there (a query before ``length`` never sees a
    key after it); K and V pass ``guard_values`` first, so that a non-finite value reaches exactly the
    rows that see it (``0 * NaN`` inside cuDNN's tiles would reach the others).
    """
    _check_shapes(q, k, v)
    if implementation is None and _cudnn_takes(q):
        from tmjax.pallas_kernels import _common

        # cuDNN multiplies V as it is: 0 * NaN inside its tiles would reach rows that cannot see the value
        k, v = _common.guard_values(k, v, length)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return _backend(_resolve(implementation, q)).causal_attention(q, k, v, length=length)


def vertical_slash_indices(
    q: jax.Array,
    k: jax.Array,
    *,
    vertical: int,
    slash: int,
    last_q: int = 64,
    force_vertical: int = 30,
    force_slash: int = 100,
    length: int | jax.Array | None = None,
    selection: str = "group",
    mass: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The columns and diagonals vertical-slash keeps: ``(columns [B, H, min(vertical, T)], diagonals
    [B, H, min(slash, T)])`` int32, ascending, where ``H`` is the KV heads (``selection="group"``) or
    the query heads (``"head"``). Slots beyond the kept entries (a sequence shorter than the budget,
    or ``mass`` reached before it) hold ``T``, which matches no key.

    Estimated on device from the last ``last_q`` real queries of each sequence (see
    ``tmjax.VerticalSlash``, also for ``mass``); q ``[B, T, Hq, D]``, k ``[B, T, Hkv, D]``,
    ``length`` as in ``triangle_attention`` (one per sequence allowed).
    """
    pattern = VerticalSlash(vertical, slash, last_q, force_vertical, force_slash, selection, mass)  # validates
    _check_shapes(q, k, k)  # no v here: k stands in for it
    return _select(q, k, pattern, length)


def _select(q: jax.Array, k: jax.Array, pattern: VerticalSlash, length) -> tuple[jax.Array, jax.Array]:
    from tmjax.pallas_kernels import vs_estimate

    return vs_estimate.select(
        q, k, vertical=pattern.vertical, slash=pattern.slash, last_q=pattern.last_q,
        force_vertical=pattern.force_vertical, force_slash=pattern.force_slash, length=length,
        selection=pattern.selection, mass=pattern.mass,
    )


def vertical_slash(
    q: jax.Array, k: jax.Array, v: jax.Array, pattern: VerticalSlash, *,
    length: int | jax.Array | None = None, implementation: str | None = None,
) -> jax.Array:
    """``vertical_slash_attention`` with the budgets of a ``VerticalSlash`` (what the decoder calls)."""
    _check_shapes(q, k, v)
    columns, diagonals = _select(q, k, pattern, length)
    name = _resolve(implementation, q)
    if implementation is None and name in _VS_NOT_YET_ON_HARDWARE:
        name = "xla"
    return _backend(name).vertical_slash_attention(q, k, v, columns=columns, diagonals=diagonals, length=length)


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    vertical: int,
    slash: int,
    last_q: int = 64,
    force_vertical: int = 30,
    force_slash: int = 100,
    length: int | jax.Array | None = None,
    selection: str = "group",
    mass: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """MInference's vertical-slash dynamic sparse attention: estimate (``vertical_slash_indices``),
    then attend to the kept columns and the 64-key blocks the kept diagonals cross.

    Same layouts, dtypes and ``length`` rules as ``triangle_attention``; budgets covering the whole
    sequence give dense causal attention (budgets beyond it are clipped to it); ``mass`` as in
    ``tmjax.VerticalSlash``. Query ``i`` sees key ``j <= i`` iff ``j`` is a kept column or lies in a
    64-key block that a kept diagonal crosses within ``i``'s 64-row query block
    (``tmjax.pallas_kernels.dynamic_tables``).
    """
    pattern = VerticalSlash(vertical, slash, last_q, force_vertical, force_slash, selection, mass)
    return vertical_slash(q, k, v, pattern, length=length, implementation=implementation)
