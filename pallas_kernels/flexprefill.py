"""FlexPrefill estimation: per sequence and selection head, query-aware key blocks or vertical-slash.

For a sequence ``b`` of true length ``L`` and selection head ``h`` (``selection`` as in
``vs_estimate``), with ``n = ceil(T / block)`` blocks of ``block`` tokens (``n_L = ceil(L / block)``
of them real) and mean-pooled queries and keys (the mean over a block's real positions):

1. *Classify* from the last ``min(block, L)`` real rows (the rows ``vs_estimate`` estimates from with
   ``last_q = block``): the true key-block distribution ``p[kb]`` is the rows' softmax mass in key
   block ``kb`` divided by the total; the estimate ``e`` is ``softmax_kb(mean(q_last) . kbar_kb /
   sqrt(D))`` over the real key blocks. With ``selection="group"`` both are averaged over the
   group's query heads. The head is *query-aware* iff ``sqrt(JS(e, p)) < tau`` (Jensen-Shannon
   divergence, natural log).
2. *Query-aware heads*: query block ``qb < n_L`` scores key blocks ``kb <= qb`` by
   ``softmax_kb(qbar_qb . kbar_kb / sqrt(D))`` (group: the mean over the group's heads) and keeps
   blocks ``0`` and ``qb`` (forced), then others by ``vs_estimate.keep``'s mass rule with ``gamma``,
   at most ``max_blocks`` in all.
3. *Vertical-slash heads*: columns and diagonals by ``vs_estimate.keep`` with ``mass=gamma`` on the
   scores of ``vs_estimate.scores(last_q=block)`` (forced prefixes, caps ``vertical`` / ``slash``).

The pooled work is O(T x D) per head plus O(n^2 x D); the ``n x n`` block scores are built
``query_blocks_per_step`` query blocks at a time so that they never exist whole (1M tokens at
block 128 would be 256 MB per query head). The classification's exact scores, like vertical-slash
estimation, hold ``[B, Hq, block, T]`` float32 at once (2 GiB at 128K tokens with 32 query heads).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tmjax.pallas_kernels import reference, vs_estimate
from tmjax.pallas_kernels.lengths import row_lengths, take_rows

_SCORE_BYTES = 1 << 26  # block scores built per step: at most this many bytes of float32


class FlexSelection(NamedTuple):
    """What a FlexPrefill layer keeps, per sequence ``b`` and selection head ``h`` (``n``: key blocks).

    - ``query_aware`` bool ``[B, H]``: the head's class;
    - ``blocks`` int32 ``[B, H, n, K]``, ``K = min(max_blocks, n)``: per query block, the kept key
      blocks (granularity ``block``) ascending, unused slots ``n``; all ``n`` for vertical-slash heads;
    - ``columns`` int32 ``[B, H, min(vertical, T)]``, ``diagonals`` int32 ``[B, H, min(slash, T)]``:
      as ``vs_estimate.select`` returns them; all ``T`` for query-aware heads.
    """

    query_aware: jax.Array
    blocks: jax.Array
    columns: jax.Array
    diagonals: jax.Array


def _block_means(x: jax.Array, lengths: jax.Array, block: int) -> jax.Array:
    """Float32 ``[B, n, H, D]``: the mean of ``x [B, T, H, D]`` over each block's real positions
    (zero for a block without any)."""
    b, t, h, d = x.shape
    n = -(-t // block)
    real = jnp.arange(t)[None, :] < lengths[:, None]
    x = jnp.where(real[:, :, None, None], x, 0)  # padding may hold anything
    x = jnp.pad(x, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
    sums = jnp.sum(x.reshape(b, n, block, h, d), axis=2, dtype=jnp.float32)
    counts = jnp.clip(lengths[:, None] - jnp.arange(n)[None, :] * block, 1, block)
    return sums / counts[:, :, None, None].astype(jnp.float32)


def _pooled_softmax(q_bar: jax.Array, k_bar: jax.Array, visible: jax.Array, group: bool) -> jax.Array:
    """``softmax_kb(q_bar . k_bar / sqrt(D))`` over the ``visible`` key blocks, float32.

    q_bar ``[B, R, Hq, D]``, k_bar ``[B, n, Hkv, D]``, visible bool ``[B, R, n]``; returns
    ``[B, H, R, n]`` (zero where not visible), averaged over each KV group's heads when ``group``.
    """
    b, r, hq, _ = q_bar.shape
    probs = vs_estimate.grouped_softmax(q_bar, k_bar, visible)
    if group:
        return probs.mean(axis=2)
    return probs.reshape(b, hq, r, -1)


def _js_distance(p: jax.Array, e: jax.Array) -> jax.Array:
    """Square-root Jensen-Shannon divergence (natural log) between distributions on the last axis."""
    m = (p + e) / 2

    def kl(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0) / jnp.where(m > 0, m, 1.0)), 0.0), axis=-1)

    return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(e), 0.0))


def _classify(q: jax.Array, k: jax.Array, k_bar: jax.Array, lengths: jax.Array, vertical: jax.Array,
              block: int, group: bool) -> jax.Array:
    """Float32 ``[B, H]`` distances of step 1 (module docstring); ``vertical`` the exact column scores."""
    b, t = q.shape[:2]
    n = k_bar.shape[1]
    rows = min(block, t)
    start = jnp.clip(lengths - rows, 0, t - rows)
    real = (start[:, None] + jnp.arange(rows)) < lengths[:, None]  # [B, R]
    q_last = jnp.where(real[:, :, None, None], take_rows(q, start, rows), 0)
    q_mean = jnp.sum(q_last, axis=1, dtype=jnp.float32) / jnp.sum(real, axis=1)[:, None, None].astype(jnp.float32)
    real_blocks = (jnp.arange(n)[None, :] * block < lengths[:, None])[:, None, :]  # [B, 1, n]
    estimate = _pooled_softmax(q_mean[:, None], k_bar, real_blocks, group)[:, :, 0]
    mass = jnp.where(jnp.isneginf(vertical), 0.0, vertical)
    mass = jnp.pad(mass, ((0, 0), (0, 0), (0, n * block - t))).reshape(*mass.shape[:2], n, block).sum(-1)
    truth = mass / jnp.sum(mass, axis=-1, keepdims=True)
    return _js_distance(truth, estimate)


def distances(q: jax.Array, k: jax.Array, *, block: int, length: int | jax.Array | None, selection: str) -> jax.Array:
    """The classification's distances ``sqrt(JS(e, p))``, float32 ``[B, H]`` (module docstring, step 1)."""
    lengths = row_lengths(length, q.shape[0], q.shape[1])
    vertical, _ = vs_estimate.scores(q, k, last_q=block, length=lengths, selection=selection)
    return _classify(q, k, _block_means(k, lengths, block), lengths, vertical, block, selection == "group")


def _query_aware_blocks(q: jax.Array, k_bar: jax.Array, lengths: jax.Array, *, block: int, gamma: float,
                        max_blocks: int, group: bool, per_step: int | None) -> jax.Array:
    """Int32 ``[B, H, n, K]`` kept key blocks of step 2 for every head, ``per_step`` query blocks at a time."""
    b, _, hq, _ = q.shape
    n = k_bar.shape[1]
    if per_step is None:
        per_step = max(1, min(n, _SCORE_BYTES // (4 * b * hq * n)))
    steps = -(-n // per_step)
    q_bar = _block_means(q, lengths, block)
    q_bar = jnp.pad(q_bar, ((0, 0), (0, steps * per_step - n), (0, 0), (0, 0)))
    q_bar = jnp.moveaxis(q_bar.reshape(b, steps, per_step, *q_bar.shape[2:]), 1, 0)
    kb = jnp.arange(n)
    n_real = -(-lengths // block)[:, None, None]  # [B, 1, 1]

    def step(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        first, q_chunk = args
        qb = (first + jnp.arange(per_step))[None, :, None]  # [1, C, 1]
        visible = (kb[None, None, :] <= qb) & (qb < n_real)  # [B, C, n]
        score = _pooled_softmax(q_chunk, k_bar, visible, group)
        score = jnp.where(visible[:, None], score, -jnp.inf)
        forced = visible & ((kb[None, None, :] == qb) | (kb[None, None, :] == 0))
        return vs_estimate.keep(score, forced[:, None], max_blocks, gamma)

    kept = lax.map(step, (jnp.arange(steps) * per_step, q_bar))  # [steps, B, H, C, K]
    kept = jnp.moveaxis(kept, 0, 2)
    return kept.reshape(*kept.shape[:2], steps * per_step, kept.shape[-1])[:, :, :n]


def select(
    q: jax.Array,
    k: jax.Array,
    *,
    gamma: float,
    tau: float,
    block: int,
    max_blocks: int,
    vertical: int,
    slash: int,
    force_vertical: int,
    force_slash: int,
    length: int | jax.Array | None,
    selection: str,
    query_blocks_per_step: int | None = None,
) -> FlexSelection:
    """The ``FlexSelection`` of q ``[B, T, Hq, D]``, k ``[B, T, Hkv, D]`` (module docstring); static
    shapes, jit-able. ``query_blocks_per_step`` (default: about 64 MB of block scores per step) only
    changes how the query-aware scores are scheduled, never the result."""
    b, t = q.shape[:2]
    lengths = row_lengths(length, b, t)
    group = selection == "group"
    v_score, s_score = vs_estimate.scores(q, k, last_q=block, length=lengths, selection=selection)
    k_bar = _block_means(k, lengths, block)
    query_aware = _classify(q, k, k_bar, lengths, v_score, block, group) < tau
    n = k_bar.shape[1]
    blocks = _query_aware_blocks(q, k_bar, lengths, block=block, gamma=gamma, max_blocks=max_blocks, group=group,
                                 per_step=query_blocks_per_step)
    columns = vs_estimate.keep(v_score, vs_estimate.forced_prefix(force_vertical, lengths, t), vertical, gamma)
    diagonals = vs_estimate.keep(s_score, vs_estimate.forced_prefix(force_slash, lengths, t), slash, gamma)
    qa = query_aware[:, :, None]
    return FlexSelection(
        query_aware=query_aware,
        blocks=jnp.where(qa[..., None], blocks, n),
        columns=jnp.where(qa, t, columns),
        diagonals=jnp.where(qa, t, diagonals),
    )


def mask(selection: FlexSelection, lengths, seq_len: int, block: int) -> np.ndarray:
    """Bool ``[B, H, T, T]`` element mask the attention follows, straight from the contract: query
    ``i < L`` sees key ``j <= i`` iff ``j // block`` is listed in ``blocks[b, h, i // block]`` or the
    vertical-slash rule of ``columns``/``diagonals`` (``reference.vertical_slash_mask``) lets it.
    Rows at or past ``L`` see nothing. Host-side numpy, O(T^2): for tests and small T only."""
    query_aware, blocks, columns, diagonals = (np.asarray(x) for x in selection)
    b, h, n, _ = blocks.shape
    out = np.zeros((b, h, seq_len, seq_len), bool)
    causal = reference.causal_mask(seq_len)
    for i, length in enumerate(np.broadcast_to(np.asarray(lengths), (b,)).tolist()):
        for j in range(h):
            listed = np.zeros((n, n), bool)
            for qb in range(n):
                kept = blocks[i, j, qb][blocks[i, j, qb] < n]
                listed[qb, kept] = True
            element = np.repeat(np.repeat(listed, block, axis=0), block, axis=1)[:seq_len, :seq_len]
            out[i, j] = (element & causal) | reference.vertical_slash_mask(seq_len, length, columns[i, j], diagonals[i, j])
            out[i, j, length:] = False
    return out
