"""Public attention entry points: layout -> table -> one kernel per backend, in that order.

Every pattern runs the same three stages, and this module is where they meet:

1. the pattern's sizes or picks (``TriangleMix`` sizes; ``VerticalSlash`` budgets, estimated and
   selected on device by ``pallas_kernels.vs_estimate``);
2. its table (``pallas_kernels.tables.Table``): static ones built at trace time by
   ``block_tables`` (triangle band, causal), dynamic ones on device by ``dynamic_tables``;
3. a backend (``tmjax.pallas_kernels.<name>``) that runs it: ``attend(q, k, v, table, length,
   tuning)``, plus ``last_rows(q_rows, k, v, start, tuning)`` for the triangle's dense last rows,
   which ``two_pass.triangle`` splices in.

The tuning (block sizes, pipeline depth) is data: ``pallas_kernels.tuning`` reads it from the
backend's table for the device, head_dim, GQA group and pattern, unless the caller passes one.
Backends are imported lazily so that a CPU install never imports GPU-only code.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from tmjax.layout import FlexPrefill, VerticalSlash

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


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A backend and the tuning one call runs it with (``kernel`` picks both)."""

    name: str
    module: ModuleType
    tuning: object
    block_q: int  # static tables' blocks
    block_kv: int
    rows_block: int  # the last-rows pass takes a multiple of this many rows

    def padded(self, seq_len: int) -> int:
        """The length a static table covers: ``seq_len`` rounded up to whole blocks."""
        return -(-seq_len // math.lcm(self.block_q, self.block_kv, self.rows_block)) * math.lcm(
            self.block_q, self.block_kv, self.rows_block)

    def guarded(self, body, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
        """``body(k, v)`` with K and V as the backend's steps need them: through ``guards.guard_values``
        where steps use V as it is, when the tuning's ``guard`` says (``guards.guarded``)."""
        if not self.module.GUARD_VALUES:
            return body(k, v)
        from tmjax.pallas_kernels.guards import guarded

        return guarded(body, k, v, lengths, self.tuning.guard)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, table, lengths: jax.Array) -> jax.Array:
        """The backend running ``table`` over inputs already ``table.seq_len`` long."""
        return self.module.attend(q, k, v, table, lengths, self.tuning)

    def last_rows(self, q_rows: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> jax.Array:
        return self.module.last_rows(q_rows, k, v, start, self.tuning)

    def run(self, q: jax.Array, k: jax.Array, v: jax.Array, table, lengths: jax.Array) -> jax.Array:
        """``attend`` on inputs right-padded to the table's length, cut back to theirs."""
        from tmjax.pallas_kernels.lengths import pad_seq

        qp, kp, vp = (pad_seq(x, table.seq_len) for x in (q, k, v))
        return self.attend(qp, kp, vp, table, lengths)[:, : q.shape[1]]


def kernel(implementation: str | None, pattern: str, q: jax.Array, k: jax.Array, v: jax.Array,
           tuning: object = None) -> Kernel:
    """The backend and tuning a call runs: the named backend (``ValueError`` if it cannot take the
    inputs), or the platform default, falling back to xla for inputs the Pallas kernels do not take
    (dtypes other than bf16/fp16, head dims other than 64/128) and for vertical-slash where its kernel
    has not yet run on the hardware. ``tuning=None`` reads the backend's tuning table."""
    from tmjax.pallas_kernels import tuning as tuning_tables

    if implementation is None:
        name = default_implementation()
        if pattern == "vertical_slash" and name in _VS_NOT_YET_ON_HARDWARE:
            name = "xla"
        if _backend(name).unsupported(q, k, v):
            name = "xla"
    else:
        name = implementation
        why = _backend(name).unsupported(q, k, v)
        if why:
            raise ValueError(why)
    module = _backend(name)
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    if tuning is None:
        tuning = tuning_tables.choose(module, name, q_heads=hq, kv_heads=hkv, head_dim=d, pattern=pattern)
    elif not isinstance(tuning, module.Tuning):
        raise TypeError(f"tuning must be None or a tmjax.pallas_kernels.{name}.Tuning (the {name} backend runs), "
                        f"got {type(tuning).__name__}")
    return Kernel(name, module, tuning, *module.block_sizes(hq, hkv, tuning))


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


def _lengths(length, q: jax.Array) -> jax.Array:
    from tmjax.pallas_kernels.lengths import row_lengths

    return row_lengths(length, q.shape[0], q.shape[1])


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
    tuning: object = None,
) -> jax.Array:
    """Triangle attention (sinks + local window + dense last rows), softmax scale ``D ** -0.5``.

    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA: KV head j serves query
    heads ``[j*g, (j+1)*g)``). ``length`` (static int or traced int32 scalar or ``[B]``, default T) is
    the true sequence length when the inputs are right-padded: the dense rows are ``[length - n_last,
    length)`` and output rows at or beyond ``length`` are unspecified. ``tuning``: the backend's
    ``Tuning`` (None: its table's entry). Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    from tmjax.pallas_kernels import block_tables, two_pass
    from tmjax.pallas_kernels.lengths import static_length

    _check_shapes(q, k, v)
    for name, value, low in (("n_init", n_init, 0), ("n_local", n_local, 1), ("n_last", n_last, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int (the layout is static), got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    seq_len, lengths = q.shape[1], _lengths(length, q)
    static = static_length(length, seq_len)
    if n_local >= seq_len or n_init >= seq_len or (static is not None and n_last >= static):
        return _causal(q, k, v, lengths, implementation, tuning)  # every visible row is dense
    run = kernel(implementation, "triangle", q, k, v, tuning)
    table = block_tables.band(run.padded(seq_len), run.block_q, run.block_kv, n_init=n_init, n_local=n_local)
    return run.guarded(lambda k, v: two_pass.triangle(q, k, v, table, lengths, n_last, band_pass=run.attend,
                                                      rows_pass=run.last_rows, rows_block=run.rows_block),
                       k, v, lengths)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    length: int | jax.Array | None = None,
    implementation: str | None = None,
    tuning: object = None,
) -> jax.Array:
    """Dense causal attention with the same layout, dtype and ``length`` rules as ``triangle_attention``.

    ``implementation=None`` on a GPU with bf16/fp16 inputs uses cuDNN
    (``jax.nn.dot_product_attention(implementation="cudnn")``); our causal-table kernels stay
    available by name. Right padding needs no mask there (a query before ``length`` never sees a
    key after it); K and V pass ``guard_values`` first, so that a non-finite value reaches exactly the
    rows that see it (``0 * NaN`` inside cuDNN's tiles would reach the others).
    """
    _check_shapes(q, k, v)
    lengths = _lengths(length, q)
    if implementation is None and tuning is None and _cudnn_takes(q):
        from tmjax.pallas_kernels.guards import guard_values

        k, v = guard_values(k, v, lengths)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return _causal(q, k, v, lengths, implementation, tuning)


def _causal(q, k, v, lengths, implementation, tuning) -> jax.Array:
    from tmjax.pallas_kernels import block_tables

    run = kernel(implementation, "causal", q, k, v, tuning)
    table = block_tables.causal(run.padded(q.shape[1]), run.block_q, run.block_kv)
    return run.guarded(lambda k, v: run.run(q, k, v, table, lengths), k, v, lengths)


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
    return _select(q, k, pattern, _lengths(length, q))


def _select(q: jax.Array, k: jax.Array, pattern: VerticalSlash | FlexPrefill, lengths: jax.Array):
    """The pattern's on-device picks: (columns, diagonals) for vertical-slash, a ``FlexSelection`` for
    FlexPrefill (every option of the pattern passed; the one place that spells them out)."""
    from tmjax.pallas_kernels import flexprefill, vs_estimate

    if isinstance(pattern, FlexPrefill):
        return flexprefill.select(
            q, k, gamma=pattern.gamma, tau=pattern.tau, block=pattern.block, max_blocks=pattern.max_blocks,
            vertical=pattern.vertical, slash=pattern.slash, force_vertical=pattern.force_vertical,
            force_slash=pattern.force_slash, length=lengths, selection=pattern.selection)
    return vs_estimate.select(
        q, k, vertical=pattern.vertical, slash=pattern.slash, last_q=pattern.last_q,
        force_vertical=pattern.force_vertical, force_slash=pattern.force_slash, length=lengths,
        selection=pattern.selection, mass=pattern.mass,
    )


def _dense_above(run: Kernel, guard: bool, q: jax.Array, k: jax.Array) -> float | None:
    """The density guard's threshold for this call (None: no guard)."""
    from tmjax.pallas_kernels import tuning as tuning_tables

    if not guard:
        return None
    return tuning_tables.dense_above(run.name, q_heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[3],
                                     pattern="vertical_slash")


def _run_dynamic(run: Kernel, q: jax.Array, k: jax.Array, v: jax.Array, table, lengths: jax.Array, guarded: bool,
                 implementation: str | None) -> jax.Array:
    """A dynamic table on ``run``; when guarded and the table is the full causal one everywhere,
    ``causal_attention`` on the caller's ``implementation`` instead (``density.choose``)."""
    from tmjax.pallas_kernels import density

    def sparse() -> jax.Array:
        return run.guarded(lambda kg, vg: run.run(q, kg, vg, table, lengths), k, v, lengths)

    if not guarded:
        return sparse()
    return density.choose(table, lengths, sparse,
                          lambda: causal_attention(q, k, v, length=lengths, implementation=implementation))


def vertical_slash(
    q: jax.Array, k: jax.Array, v: jax.Array, pattern: VerticalSlash, *,
    length: int | jax.Array | None = None, implementation: str | None = None, tuning: object = None,
) -> jax.Array:
    """``vertical_slash_attention`` with the budgets of a ``VerticalSlash`` (what the layer plan calls)."""
    _check_shapes(q, k, v)
    lengths = _lengths(length, q)
    columns, diagonals = _select(q, k, pattern, lengths)  # estimate and select, on device
    return attend_picks(q, k, v, columns, diagonals, lengths, guard=pattern.guard, implementation=implementation,
                        tuning=tuning)


def attend_picks(q: jax.Array, k: jax.Array, v: jax.Array, columns: jax.Array, diagonals: jax.Array,
                 lengths: jax.Array, *, guard: bool, implementation: str | None, tuning: object = None) -> jax.Array:
    """Vertical-slash attention on picks made elsewhere (``vertical_slash_indices``' format; ``lengths``
    int32 ``[B]``): the table, the density guard, the kernel (also for benchmarks replaying picks)."""
    from tmjax.pallas_kernels import dynamic_tables
    from tmjax.pallas_kernels.lengths import round_up

    run = kernel(implementation, "vertical_slash", q, k, v, tuning)
    dense_above = _dense_above(run, guard, q, k)
    table = dynamic_tables.vertical_slash(columns, diagonals, lengths, round_up(q.shape[1], dynamic_tables.BLOCK),
                                          dense_above)
    return _run_dynamic(run, q, k, v, table, lengths, dense_above is not None, implementation)


def flexprefill_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pattern: FlexPrefill, *,
    length: int | jax.Array | None = None, implementation: str | None = None, tuning: object = None,
    return_selection: bool = False,
):
    """FlexPrefill (``tmjax.FlexPrefill``): estimate and select on device
    (``pallas_kernels.flexprefill.select``), one table of 64-token key-block lists for every head
    (``dynamic_tables.flexprefill``), then the backend's kernel.

    Same layouts, dtypes and ``length`` rules as ``triangle_attention``. Query ``i`` sees key ``j``
    as ``pallas_kernels.flexprefill.mask`` says, except that with ``pattern.guard`` a head above the
    density threshold sees every ``j <= i`` (``pallas_kernels.density``). ``return_selection``: also
    return the ``FlexSelection`` the call made (tests, inspection).
    """
    from tmjax.pallas_kernels import dynamic_tables
    from tmjax.pallas_kernels.lengths import round_up

    if not isinstance(pattern, FlexPrefill):
        raise TypeError(f"pattern must be a tmjax.FlexPrefill, got {type(pattern).__name__}")
    _check_shapes(q, k, v)
    lengths = _lengths(length, q)
    selection = _select(q, k, pattern, lengths)
    run = kernel(implementation, "vertical_slash", q, k, v, tuning)  # the dynamic tables' kernel
    dense_above = _dense_above(run, pattern.guard, q, k)
    table = dynamic_tables.flexprefill(selection, lengths, round_up(q.shape[1], dynamic_tables.BLOCK), pattern.block,
                                       dense_above)
    out = _run_dynamic(run, q, k, v, table, lengths, dense_above is not None, implementation)
    return (out, selection) if return_selection else out


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
    guard: bool = True,
    implementation: str | None = None,
    tuning: object = None,
) -> jax.Array:
    """MInference's vertical-slash dynamic sparse attention: estimate (``vertical_slash_indices``),
    then attend to the kept columns and the 64-key blocks the kept diagonals cross.

    Same layouts, dtypes and ``length`` rules as ``triangle_attention``; budgets covering the whole
    sequence give dense causal attention (budgets beyond it are clipped to it); ``mass`` as in
    ``tmjax.VerticalSlash``. Query ``i`` sees key ``j <= i`` iff ``j`` is a kept column or lies in a
    64-key block that a kept diagonal crosses within ``i``'s 64-row query block
    (``tmjax.pallas_kernels.dynamic_tables``). ``guard`` as in ``tmjax.VerticalSlash``: a head above
    the backend's density threshold sees every ``j <= i``.
    """
    pattern = VerticalSlash(vertical, slash, last_q, force_vertical, force_slash, selection, mass, guard)
    return vertical_slash(q, k, v, pattern, length=length, implementation=implementation, tuning=tuning)


def attend_table(q: jax.Array, k: jax.Array, v: jax.Array, table, *, length: int | jax.Array | None = None,
                 implementation: str | None = None, tuning: object = None) -> jax.Array:
    """Attention following a table the caller built (``pallas_kernels.dynamic_tables`` or
    ``block_tables``): for picks made elsewhere (tests, benchmarks, new estimators)."""
    _check_shapes(q, k, v)
    lengths = _lengths(length, q)
    pattern = "vertical_slash" if table.dynamic else ("causal" if table.n_local is None else "triangle")
    run = kernel(implementation, pattern, q, k, v, tuning)
    return run.guarded(lambda k, v: run.run(q, k, v, table, lengths), k, v, lengths)
