"""What the attention test files share: inputs, the backends under test and the error measure.

Errors are relative L2 per case, ``||out - ref|| / ||ref||`` against dense float32 attention on the
same (rounded) inputs; a max-abs bound scaled by ``max|ref|`` is too loose, since the first rows
(few keys) are several times larger than the rest. ``REL_L2`` sits above the measured errors of
correct kernels (bf16 about 1.9e-3, fp16 about 2.3e-4, float32 about 1e-7) and below what real bugs
give (a softmax scale of ``1/sqrt(D-1)``: 6.9e-3 in bf16, 3.0e-3 in fp16).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmjax.pallas_kernels import reference, tables

REL_L2 = {"float32": 1e-5, "bfloat16": 4e-3, "float16": 1e-3}


def random_qkv(seed: int, batch: int, seq_len: int, q_heads: int, kv_heads: int, head_dim: int, dtype
               ) -> list[jnp.ndarray]:
    """Standard-normal q ``[B, T, Hq, D]`` and k, v ``[B, T, Hkv, D]`` in ``dtype`` (never zeros: they hide
    unwritten outputs and wrong indexing)."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq_len, q_heads, head_dim)] + [(batch, seq_len, kv_heads, head_dim)] * 2
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype) for s in shapes]


def rel_l2(out: jax.Array, ref: jax.Array) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def assert_matches(out: jax.Array, ref: jax.Array, dtype, what: str = "") -> float:
    """Finite, and within the dtype's relative L2 bound of ``ref``; returns the error."""
    assert np.isfinite(np.asarray(out, np.float32)).all(), f"{what}: non-finite output"
    err, bound = rel_l2(out, ref), REL_L2[jnp.dtype(dtype).name]
    assert err <= bound, f"{what}: relative L2 error {err:.2e} > {bound:.0e} ({jnp.dtype(dtype).name})"
    return err


def _platform() -> str:
    return jax.devices()[0].platform


def _hopper() -> bool:
    return _platform() == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "0")).startswith("9")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation under test: the dtypes it takes, the shapes it is run on, where it runs.

    Every dtype-agnostic test runs in ``dtypes[0]``; a backend never skips a case for its dtype.
    """

    name: str
    dtypes: tuple[str, ...]
    max_seq_len: int = 1 << 16
    head_dims: tuple[int, ...] = (64, 128)
    long_context: bool = True  # the 32K-token triangle run
    runs_here: bool = True
    why_not: str = ""

    @property
    def dtype(self):
        return jnp.dtype(self.dtypes[0])

    def require(self, seq_len: int = 0, head_dim: int = 64) -> None:
        if not self.runs_here:
            pytest.skip(f"{self.name}: {self.why_not}")
        if seq_len > self.max_seq_len or head_dim not in self.head_dims:
            pytest.skip(f"{self.name} is not run at T={seq_len}, D={head_dim} (interpreter too slow / unsupported)")


_INTERPRETED = _platform() == "cpu"
BACKENDS = [
    Backend("xla", ("float32", "bfloat16")),
    # On CPU the Pallas kernels run in the interpreter: slow, so short sequences only.
    Backend("triton", ("bfloat16", "float16"), max_seq_len=1024 if _INTERPRETED else 1 << 16,
            long_context=not _INTERPRETED, runs_here=_platform() in ("cpu", "gpu"), why_not="needs a CUDA GPU or CPU"),
    Backend("tpu", ("bfloat16", "float16"), max_seq_len=1024, long_context=False,
            runs_here=_platform() in ("cpu", "tpu"), why_not="needs a TPU or the CPU interpreter"),
    Backend("mosaic_gpu", ("bfloat16", "float16"), runs_here=_hopper(), why_not="needs a Hopper GPU"),
]


def backend_dtype_params() -> list:
    """pytest params ``(backend, dtype_name)`` for every dtype each backend takes."""
    return [pytest.param(b, d, id=f"{b.name}-{d}") for b in BACKENDS for d in b.dtypes]


def table_mask(table: tables.Table, b: int, h: int, length: int) -> np.ndarray:
    """The element mask a kernel following ``table`` computes for sequence b, head h (rows < length):
    listed blocks ``[0, num_full)`` whole, the others causal, then the counted columns."""
    bq, bkv = table.block_q, table.block_kv
    nq = table.num_q_blocks
    mask = np.zeros((nq * bq, nq * bq), bool)
    full, steps = (np.asarray(x)[b, h] for x in (table.num_full, table.num_steps))
    chunks = np.asarray(table.n_chunks)[b, h] if table.columns is not None else np.zeros(nq, int)
    columns = np.asarray(table.columns)[b, h] if table.columns is not None else None
    width = tables.COLUMN_CHUNK
    listed = tables.listed_blocks(table, b, h)
    for qb in range(nq):
        rows = np.arange(qb * bq, (qb + 1) * bq)
        for s, kb in enumerate(listed[qb]):
            keys = kb * bkv + np.arange(bkv)
            assert not mask[rows[-1], keys].any(), "a key block listed twice"
            mask[rows[:, None], keys[None, :]] = True if s < full[qb] else keys[None, :] <= rows[:, None]
        assert steps[qb] == 0 or listed[qb][-1] == qb, "the diagonal block is not last"
        for c in range(chunks[qb]):
            counted = np.asarray(tables.chunk_mask(table.column_bits, jnp.int32(c)))[b, h, qb]
            keys = columns[c * width : (c + 1) * width][counted]
            assert not mask[rows[-1], keys].any(), "a column counted twice"
            mask[rows[:, None], keys[None, :]] = True
    mask[length:] = False
    return mask


def injected_hook(switch_layer: int, triangle: np.ndarray, host_masks: Callable[..., np.ndarray],
                  picks: Callable) -> Callable:
    """A decoder attention hook of the reference model: the triangle mask from ``switch_layer`` on, and
    below it the dynamic method's masks recomputed on the host (``host_masks(*picks(q, k, length),
    length, seq_len=, q_heads=)`` -> bool ``[B, Hq, T, T]``, through ``pure_callback``) from the picks
    the library's own selection returns."""
    def hook(layer, q, k, v, length):
        b, t, hq = q.shape[0], q.shape[1], q.shape[2]
        shape = jax.ShapeDtypeStruct((b, hq, t, t), jnp.bool_)
        masks = jax.pure_callback(functools.partial(host_masks, seq_len=t, q_heads=hq), shape,
                                  *picks(q, k, length), length)
        return jnp.where(layer >= switch_layer, reference.masked_attention(q, k, v, triangle),
                         reference.masked_attention(q, k, v, masks))
    return hook
