"""Static block tables: for each query block, the key blocks it needs and which of them need masking.

Built analytically with numpy at trace time, in time linear in the number of listed blocks (no
element-wise mask is ever materialised), so that a kernel can visit only the listed K/V blocks and
apply the token-level mask only on the partial ones.

A table describes the mask ``visible(i, j) = j <= i and (j < n_init or i - j < n_local or
i >= seq_len - n_last)``: with ``n_last = 0`` that is the triangle's band (attention sinks + local
window), with ``n_init = 0, n_local >= seq_len`` plain causal attention, and with all three the whole
Triangle mask of ``tmjax.pallas_kernels.reference.triangle_mask``.

Row ``r`` of a table lists its ``num_steps[r]`` key blocks in ``kv_index[r]``: the full blocks
first (ascending), then the partial ones (ascending), so ``partial[r, s] == (s >= num_full[r])``.
Entries past ``num_steps[r]`` repeat the row's last entry (a pipeline that re-requests the block
it already holds issues no new copy) and must not be computed.

``band`` and ``causal`` give these tables in the kernels' format (``tables.Table``), cached per shape.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from tmjax.pallas_kernels.tables import Table


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTable:
    """Per query block: ordered key-block list (full first, then partial), padded to one width."""

    kv_index: np.ndarray  # int32 [num_q_blocks, max_steps]
    partial: np.ndarray  # bool [num_q_blocks, max_steps]
    num_steps: np.ndarray  # int32 [num_q_blocks]
    num_full: np.ndarray  # int32 [num_q_blocks]
    seq_len: int
    block_q: int
    block_kv: int

    @property
    def max_steps(self) -> int:
        return self.kv_index.shape[1]

    def block_mask(self) -> np.ndarray:
        """Bool ``[num_q_blocks, num_kv_blocks]`` of listed blocks (for tests and inspection)."""
        nq = self.kv_index.shape[0]
        nk = -(-self.seq_len // self.block_kv)
        mask = np.zeros((nq, nk), dtype=bool)
        valid = np.arange(self.max_steps)[None, :] < self.num_steps[:, None]
        rows = np.broadcast_to(np.arange(nq)[:, None], self.kv_index.shape)
        mask[rows[valid], self.kv_index[valid]] = True
        return mask

    def listed_keys(self, q_block: int) -> np.ndarray:
        """Bool ``[seq_len]``: the key positions inside the blocks listed for ``q_block``."""
        keys = np.zeros(-(-self.seq_len // self.block_kv) * self.block_kv, dtype=bool)
        for j in self.kv_index[q_block, : self.num_steps[q_block]]:
            keys[j * self.block_kv : (j + 1) * self.block_kv] = True
        return keys[: self.seq_len]


def _check(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def block_table(
    seq_len: int,
    block_q: int,
    block_kv: int,
    *,
    n_init: int = 0,
    n_local: int | None = None,
    n_last: int = 0,
) -> BlockTable:
    """The block table of the mask above over ``seq_len`` tokens (``n_local=None``: causal).

    Blocks at the end may be cut short by ``seq_len``; a kernel that pads to whole blocks treats the
    padded keys as invisible through causality (they lie after every real query).
    """
    _check("seq_len", seq_len, 1)
    _check("block_q", block_q, 1)
    _check("block_kv", block_kv, 1)
    _check("n_init", n_init, 0)
    _check("n_last", n_last, 0)
    if n_local is None:
        n_local = seq_len
    _check("n_local", n_local, 1)
    n_local = min(n_local, seq_len)
    n_last = min(n_last, seq_len)

    nq = -(-seq_len // block_q)
    r0 = np.arange(nq, dtype=np.int64) * block_q
    r1 = np.minimum(r0 + block_q, seq_len) - 1
    dense_from = seq_len - n_last  # rows >= dense_from see every earlier key
    # Band rows of a query block are [r0, rb], dense rows [rd, r1]; either range may be empty.
    rb = np.minimum(r1, dense_from - 1)
    rd = np.maximum(r0, dense_from)
    has_band = rb >= r0
    has_dense = rd <= r1

    # Candidate key blocks: the sink blocks [0, sink_end) and one contiguous range [lo, hi].
    hi = r1 // block_kv
    window_lo = np.maximum(r0 - n_local + 1, 0) // block_kv
    lo = np.where(has_dense, 0, window_lo)
    sink_end = np.minimum(-(-min(n_init, seq_len) // block_kv), hi + 1)
    sink_count = np.minimum(sink_end, lo)  # sink blocks not already inside [lo, hi]
    range_count = hi - lo + 1
    counts = sink_count + range_count

    rows = np.repeat(np.arange(nq), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    j = np.where(offset < sink_count[rows], offset, lo[rows] + offset - sink_count[rows])
    c0 = j * block_kv
    c1 = np.minimum(c0 + block_kv, seq_len) - 1

    band_any, band_full = _band_flags(r0[rows], rb[rows], c0, c1, n_init, n_local)
    dense_any = c0 <= r1[rows]
    dense_full = c1 <= rd[rows]
    any_visible = (has_band[rows] & band_any) | (has_dense[rows] & dense_any)
    full = (~has_band[rows] | band_full) & (~has_dense[rows] | dense_full)
    if not any_visible.all():
        raise AssertionError("block table candidate without a visible key: builder bug")

    order = np.lexsort((j, ~full, rows))  # by row, full blocks first, then ascending block
    rows, j, full = rows[order], j[order], full[order]
    num_full = np.bincount(rows, weights=full, minlength=nq).astype(np.int32)
    width = int(counts.max())
    pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    kv_index = np.empty((nq, width), dtype=np.int32)
    kv_index[:] = j[np.cumsum(counts) - 1][:, None]  # padding repeats the last listed block
    kv_index[rows, pos] = j
    partial = np.arange(width)[None, :] >= num_full[:, None]
    return BlockTable(
        kv_index=kv_index,
        partial=partial,
        num_steps=counts.astype(np.int32),
        num_full=num_full,
        seq_len=seq_len,
        block_q=block_q,
        block_kv=block_kv,
    )


def _band_flags(r0, r1, c0, c1, n_init: int, n_local: int):
    """Whether the block rows [r0, r1] x keys [c0, c1] has any / only visible band entries."""
    causal_any = c0 <= r1
    sink_any = c0 < n_init
    # r - c ranges over [r0 - c1, r1 - c0]; the window needs 0 <= r - c < n_local.
    window_any = r0 - c1 < n_local
    any_visible = causal_any & (sink_any | window_any)
    causal_full = c1 <= r0
    non_sink_from = np.maximum(c0, n_init)  # the farthest key that is not a sink
    window_full = (c1 < n_init) | (r1 - non_sink_from < n_local)
    return any_visible, causal_full & window_full


def band_table(seq_len: int, block_q: int, block_kv: int, *, n_init: int, n_local: int) -> BlockTable:
    """Table of the triangle's band (sinks + local window, causal), without the dense last rows."""
    return block_table(seq_len, block_q, block_kv, n_init=n_init, n_local=n_local)


def causal_table(seq_len: int, block_q: int, block_kv: int) -> BlockTable:
    """Table of dense causal attention (same machinery, window as long as the sequence)."""
    return block_table(seq_len, block_q, block_kv)


def to_table(table: BlockTable, *, n_init: int = 0, n_local: int | None = None) -> Table:
    """``table`` in the kernels' format, its partial blocks masked by the band rule (``n_local=None``:
    causal only)."""
    nq, width = table.kv_index.shape
    return Table(
        index=table.kv_index.reshape(-1), first=(np.arange(nq) * width).astype(np.int32),
        num_full=table.num_full, num_steps=table.num_steps, seq_len=table.seq_len, block_q=table.block_q,
        block_kv=table.block_kv, max_steps=width, n_init=n_init, n_local=n_local,
    )


@functools.lru_cache(maxsize=64)
def band(seq_len: int, block_q: int, block_kv: int, *, n_init: int, n_local: int) -> Table:
    """The kernels' table of the triangle's band (sinks + local window, causal)."""
    return to_table(band_table(seq_len, block_q, block_kv, n_init=n_init, n_local=n_local), n_init=n_init, n_local=n_local)


@functools.lru_cache(maxsize=64)
def causal(seq_len: int, block_q: int, block_kv: int) -> Table:
    """The kernels' table of dense causal attention."""
    return to_table(causal_table(seq_len, block_q, block_kv))
