"""The one table format every kernel runs: per query block, the key blocks to visit, and optionally
gathered key columns. The dispatch builds it (``block_tables`` at trace time for static patterns,
``dynamic_tables`` on device for dynamic ones); a backend's ``attend(q, k, v, table, length, tuning)``
runs it.

Key blocks, as compressed rows: query block ``qb`` visits ``num_steps[qb]`` key blocks, entry ``s``
being ``index[first[qb] + s]`` (or ``qb - index[first[qb] + s]`` when ``relative``: offsets, which
let every full query block of a vertical-slash row share one list). Steps ``[0, num_full)`` are
visible whole (no mask), steps ``[num_full, num_steps)`` are masked token by token with the table's
rule: causal, and the band's ``j < n_init or i - j < n_local`` when ``n_local`` is set. Blocks are
``block_q`` query rows by ``block_kv`` keys.

- Static tables (triangle band, causal): numpy arrays without batch or head axes (``index [L]``,
  the others ``[nq]``), shared by every sequence and head. A row's entries past ``num_steps`` repeat
  its last block (a pipeline that re-requests the block it holds issues no new copy).
- Dynamic tables: device arrays ``[B, H, ...]``, one row set per sequence ``b`` and selection head
  ``h`` (``h`` reads KV head ``h * Hkv // H``). Vertical-slash stores offsets (``relative``);
  explicit block lists (FlexPrefill, every head) store absolute blocks.
- Column phase (vertical-slash, FlexPrefill's vertical-slash heads): after its key blocks, query block ``qb`` visits ``n_chunks[qb]``
  chunks of 64 gathered columns (``columns [B, H, Vp]``, ascending, padded with ``T``); bit ``c`` of
  word ``w`` of ``column_bits[qb]`` says whether column ``32 w + c`` counts for ``qb``.

Memory (why vertical-slash keeps offsets): at 128K tokens in 64-blocks (nq = 2048) with 6096
diagonals, a row can cross every offset, so explicit lists need ``nq x nq`` int32 = 16 MiB per
(sequence, head): 128 MiB a layer for 8 KV heads, 512 MiB for 32 query heads, beside 512 MiB of K and
V; offsets need ``2 nq`` entries plus three ``[nq]`` arrays, 40 KiB per head. FlexPrefill's lists
(``dynamic_tables.flexprefill``, 64-token blocks, ``nq x W`` with ``W <= nq``) take up to those 16 MiB
per selection head: the price of one table format for its two head classes (8 KV groups at 128K:
128 MiB a layer, transient).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

COLUMN_CHUNK = 64  # gathered columns per step of the column phase
_WORD = 32  # column bits per int32 word


@dataclasses.dataclass(frozen=True)
class Rule:
    """The token rule of a table's masked steps: causal, and the band's sinks + window when
    ``n_local`` is set (plain Python values: kernels close over it)."""

    n_init: int = 0
    n_local: int | None = None

    def visible(self, rows, cols):
        """Bool, broadcasting ``rows`` against ``cols`` positions."""
        seen = cols <= rows
        if self.n_local is not None:
            seen &= (cols < self.n_init) | (rows - cols < self.n_local)
        return seen


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
    """Key blocks per query block (and optional columns); see the module docstring."""

    index: jax.Array | np.ndarray  # int32 [L] (static) or [B, H, L] (dynamic)
    first: jax.Array | np.ndarray  # int32 [nq] or [B, H, nq]
    num_full: jax.Array | np.ndarray  # int32 [nq] or [B, H, nq]
    num_steps: jax.Array | np.ndarray  # int32 [nq] or [B, H, nq]
    columns: jax.Array | None = None  # int32 [B, H, Vp]
    n_chunks: jax.Array | None = None  # int32 [B, H, nq]
    column_bits: jax.Array | None = None  # int32 [B, H, nq, Vp / 32]
    # Static description (pytree metadata):
    seq_len: int = 0  # the padded length the table covers
    block_q: int = 64
    block_kv: int = 64
    max_steps: int = 0  # a bound on num_steps (grids that walk steps use it)
    relative: bool = False  # index holds offsets qb - kb
    n_init: int = 0
    n_local: int | None = None  # None: partial steps are causal only

    @property
    def dynamic(self) -> bool:
        """One row set per (sequence, selection head), on device; else one shared static set."""
        return self.index.ndim == 3

    @property
    def num_q_blocks(self) -> int:
        return self.first.shape[-1]

    @property
    def heads(self) -> int | None:
        """Selection heads of a dynamic table (None for a static one)."""
        return self.index.shape[1] if self.dynamic else None

    @property
    def max_chunks(self) -> int:
        """Column chunks a query block may visit (0 without a column phase)."""
        return 0 if self.columns is None else self.columns.shape[-1] // COLUMN_CHUNK

    def key_block(self, qb, entry):
        """The key block an ``index`` entry names for query block ``qb`` (works on traced values)."""
        return qb - entry if self.relative else entry

    @property
    def rule(self) -> Rule:
        """The token rule of the masked steps."""
        return Rule(self.n_init, self.n_local)

    def visible(self, rows, cols):
        """The token rule of a masked step: bool, broadcasting ``rows`` against ``cols`` positions."""
        return self.rule.visible(rows, cols)

    def arrays(self) -> dict:
        """The device arrays a kernel reads (columns included when there is a column phase)."""
        names = ("index", "first", "num_full", "num_steps") + (
            ("columns", "n_chunks", "column_bits") if self.columns is not None else ())
        return {name: jnp.asarray(getattr(self, name)) for name in names}


jax.tree_util.register_dataclass(
    Table,
    data_fields=["index", "first", "num_full", "num_steps", "columns", "n_chunks", "column_bits"],
    meta_fields=["seq_len", "block_q", "block_kv", "max_steps", "relative", "n_init", "n_local"],
)


def chunk_mask(column_bits: jax.Array, chunk: jax.Array) -> jax.Array:
    """Bool ``[..., 64]`` from ``column_bits [..., Vp / 32]``: which columns of chunk ``chunk`` count."""
    words = jax.lax.dynamic_slice_in_dim(column_bits, chunk * (COLUMN_CHUNK // _WORD), COLUMN_CHUNK // _WORD, axis=-1)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint32)[..., None] >> jnp.arange(_WORD, dtype=jnp.uint32)
    return (bits & 1).astype(bool).reshape(*words.shape[:-1], COLUMN_CHUNK)


def kv_heads(selection_heads: int, kv_heads_: int) -> jax.Array:
    """The KV head each selection head reads: itself (per-group selection) or its query head's group."""
    return jnp.arange(selection_heads) * kv_heads_ // selection_heads


def gather_columns(x: jax.Array, table: Table) -> jax.Array:
    """``x [B, T, Hkv, D]`` at every selection head's kept columns: ``[B, H, Vp, D]`` (padding slots
    read position ``T - 1``; the column bits never count them)."""
    b, h = table.columns.shape[:2]
    pos = jnp.minimum(table.columns, x.shape[1] - 1)
    return x[jnp.arange(b)[:, None, None], pos, kv_heads(h, x.shape[2])[None, :, None]]


def listed_blocks(table: Table, b: int = 0, h: int = 0) -> list[np.ndarray]:
    """Per query block, the key blocks the table lists (host side, for tests and inspection)."""
    pick = (lambda x: np.asarray(x)[b, h]) if table.dynamic else np.asarray
    index, first, steps = pick(table.index), pick(table.first), pick(table.num_steps)
    return [np.asarray([table.key_block(qb, index[first[qb] + s]) for s in range(steps[qb])], np.int64)
            for qb in range(len(first))]
