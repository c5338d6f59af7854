"""Shared attention suite: every backend against dense float32 attention with element-wise masks.

Adding a backend is one line in ``attention_fixtures.BACKENDS``; each case runs in every dtype the
backend takes, and dtype-agnostic tests in its first one, so no backend skips a case for its dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmjax
from tmjax.pallas_kernels import reference
from attention_fixtures import BACKENDS, assert_matches, backend_dtype_params, random_qkv


@dataclasses.dataclass(frozen=True)
class Case:
    seq_len: int
    n_init: int
    n_local: int
    n_last: int
    q_heads: int
    kv_heads: int
    head_dim: int


# Lengths are multiples of no block size; GQA ratios 1, 4 and 7; head_dim 64 and 128.
TRIANGLE_CASES = {
    "ragged": Case(333, 4, 40, 24, 4, 1, 64),
    "longer": Case(700, 8, 130, 64, 7, 1, 64),
    "t_below_n_local": Case(100, 4, 128, 16, 7, 1, 128),
    "t_below_n_init_plus_n_last": Case(50, 30, 8, 40, 2, 2, 64),
    "no_sinks_no_last_rows": Case(517, 0, 100, 0, 2, 2, 128),
    "n_last_covers_all": Case(200, 3, 20, 256, 4, 1, 64),
    "diagonal_only_window": Case(130, 2, 1, 10, 8, 2, 128),
    "sinks_cover_all": Case(60, 64, 8, 0, 4, 1, 64),
}
CAUSAL_CASES = {
    "ragged": Case(333, 0, 0, 0, 4, 1, 64),
    "multi_chunk_gqa7": Case(700, 0, 0, 0, 7, 1, 128),
    "tiny_mha": Case(37, 0, 0, 0, 2, 2, 64),
}


@functools.partial(jax.jit, static_argnames=("implementation", "n_init", "n_local", "n_last"))
def _triangle(q, k, v, length, *, implementation, n_init, n_local, n_last):
    return tmjax.triangle_attention(
        q, k, v, n_init=n_init, n_local=n_local, n_last=n_last, length=length, implementation=implementation
    )


@functools.partial(jax.jit, static_argnames=("implementation",))
def _causal(q, k, v, length, *, implementation):
    return tmjax.causal_attention(q, k, v, length=length, implementation=implementation)


# Jitted so that each reference is one compilation rather than a string of eager ops.
_reference = jax.jit(reference.masked_attention)


def _float32(*arrays):
    return [a.astype(jnp.float32) for a in arrays]


def _as(dtype, *arrays):
    return [a.astype(dtype) for a in arrays]


@pytest.mark.parametrize("case", list(TRIANGLE_CASES.values()), ids=list(TRIANGLE_CASES))
@pytest.mark.parametrize("backend, dtype", backend_dtype_params())
def test_triangle_matches_dense_reference(backend, dtype, case):
    backend.require(case.seq_len, case.head_dim)
    q, k, v = random_qkv(0, 2, case.seq_len, case.q_heads, case.kv_heads, case.head_dim, dtype)
    out = _triangle(
        q, k, v, None, implementation=backend.name, n_init=case.n_init, n_local=case.n_local, n_last=case.n_last
    )
    mask = reference.triangle_mask(case.seq_len, case.n_init, case.n_local, case.n_last)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, dtype)
    assert_matches(out, _reference(*_float32(q, k, v), mask), dtype, backend.name)


@pytest.mark.parametrize("case", list(CAUSAL_CASES.values()), ids=list(CAUSAL_CASES))
@pytest.mark.parametrize("backend, dtype", backend_dtype_params())
def test_causal_matches_dense_reference(backend, dtype, case):
    backend.require(case.seq_len, case.head_dim)
    q, k, v = random_qkv(1, 2, case.seq_len, case.q_heads, case.kv_heads, case.head_dim, dtype)
    out = _causal(q, k, v, None, implementation=backend.name)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, dtype)
    assert_matches(out, _reference(*_float32(q, k, v), reference.causal_mask(case.seq_len)), dtype, backend.name)


PADDED = Case(300, 4, 40, 24, 4, 2, 64)


def _padded_masks(length: int, c: Case) -> tuple[np.ndarray, np.ndarray]:
    """Triangle and causal masks of a ``length``-token prompt inside the padded ``[T, T]`` shape (one
    compilation of the reference for every length; padded keys are never visible)."""
    tri, causal = np.zeros((2, c.seq_len, c.seq_len), bool)
    tri[:length, :length] = reference.triangle_mask(length, c.n_init, c.n_local, c.n_last)
    causal[:length, :length] = reference.causal_mask(length)
    return tri, causal


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_right_padding_with_traced_length_matches_unpadded(backend):
    """Garbage in the padding must not reach rows < length; the dense rows move with length."""
    c, dtype = PADDED, backend.dtype
    backend.require(c.seq_len, c.head_dim)
    q, k, v = random_qkv(2, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, dtype)
    pad_garbage = lambda x, n: jnp.where((jnp.arange(c.seq_len) >= n)[None, :, None, None], 30 * x, x)  # noqa: E731
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)
    # 300: no padding; 237: typical; 20: shorter than n_last (all rows dense); 1: a single token.
    for length in (300, 237, 20, 1):
        qg, kg, vg = (pad_garbage(x, length) for x in (q, k, v))
        traced = jnp.asarray(length, jnp.int32)
        tri = _triangle(qg, kg, vg, traced, implementation=backend.name, **sizes)[:, :length]
        causal = _causal(qg, kg, vg, traced, implementation=backend.name)[:, :length]
        tri_mask, causal_mask = _padded_masks(length, c)
        assert_matches(tri, _reference(*_float32(q, k, v), tri_mask)[:, :length], dtype, f"triangle L={length}")
        assert_matches(causal, _reference(*_float32(q, k, v), causal_mask)[:, :length], dtype, f"causal L={length}")
        unpadded = _triangle(*(x[:, :length] for x in (q, k, v)), None, implementation=backend.name, **sizes)
        # Not bit-exact: chunk sizes (and, for short inputs, the code path) depend on T.
        assert_matches(tri, unpadded, dtype, f"padded vs unpadded L={length}")
        if length in (237, 20):
            static = functools.partial(tmjax.triangle_attention, **sizes, length=length, implementation=backend.name)
            assert_matches(jax.jit(static)(qg, kg, vg)[:, :length], unpadded, dtype, f"static L={length}")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_per_row_lengths_match_each_row_alone(backend):
    """``length`` of shape [B]: each row's dense last rows start at its own length, and every row
    equals the same row run alone with a scalar length (padding filled with garbage)."""
    c, dtype = PADDED, backend.dtype
    backend.require(c.seq_len, c.head_dim)
    lengths = np.array([300, 137, 20, 1], np.int32)
    q, k, v = random_qkv(5, len(lengths), c.seq_len, c.q_heads, c.kv_heads, c.head_dim, dtype)
    pad = (np.arange(c.seq_len)[None, :] >= lengths[:, None])[:, :, None, None]
    qg, kg, vg = (jnp.where(pad, 30 * x, x) for x in (q, k, v))
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)
    tri = _triangle(qg, kg, vg, jnp.asarray(lengths), implementation=backend.name, **sizes)
    causal = _causal(qg, kg, vg, jnp.asarray(lengths), implementation=backend.name)
    for b, length in enumerate(lengths):
        row = slice(b, b + 1)
        tri_mask, causal_mask = _padded_masks(int(length), c)
        ref = _reference(*_float32(q[row], k[row], v[row]), tri_mask)
        assert_matches(tri[row, :length], ref[:, :length], dtype, f"triangle row {b} (L={length})")
        ref = _reference(*_float32(q[row], k[row], v[row]), causal_mask)
        assert_matches(causal[row, :length], ref[:, :length], dtype, f"causal row {b} (L={length})")
        alone = _triangle(qg[row], kg[row], vg[row], jnp.int32(length), implementation=backend.name, **sizes)
        assert_matches(tri[row, :length], alone[:, :length], dtype, f"row {b} vs alone")


def _triangle_mask_rows(rows: np.ndarray, seq_len: int, n_init: int, n_local: int, n_last: int) -> np.ndarray:
    """Rows of the triangle mask, recomputed from the definition without the ``[T, T]`` matrix."""
    i, j = rows[:, None], np.arange(seq_len)[None, :]
    return (j <= i) & ((j < n_init) | (i - j < n_local) | (i >= seq_len - n_last))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_triangle_at_32k_tokens_is_linear_memory(backend):
    seq_len, n_init, n_local, n_last = 32768, 8, 512, 128
    backend.require()
    if not backend.long_context or backend.dtype != jnp.float32:
        pytest.skip(f"{backend.name}: the 32K memory check runs on the float32 XLA path")
    q, k, v = random_qkv(3, 1, seq_len, 2, 1, 16, jnp.float32)
    fn = functools.partial(
        _triangle, implementation=backend.name, n_init=n_init, n_local=n_local, n_last=n_last
    )
    compiled = jax.jit(fn).lower(q, k, v, None).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < seq_len * seq_len * 4 // 50, f"temp memory {temp / 2**20:.0f} MiB is not far below T^2"
    out = compiled(q, k, v, None)
    rng = np.random.default_rng(4)
    edges = [np.arange(12), np.arange(n_local - 3, n_local + 3), np.arange(seq_len - n_last - 3, seq_len - n_last + 3)]
    rows = np.unique(np.concatenate(edges + [rng.integers(0, seq_len, 200), np.arange(seq_len - 6, seq_len)]))
    ref = _reference(q[:, rows], k, v, _triangle_mask_rows(rows, seq_len, n_init, n_local, n_last))
    assert_matches(out[:, rows], ref, jnp.float32, "32K triangle rows")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_causal_at_8k_tokens_needs_less_than_one_score_matrix(backend):
    seq_len = 8192
    backend.require(seq_len, 64)
    shapes = [jax.ShapeDtypeStruct((1, seq_len, h, 64), backend.dtype) for h in (9, 3, 3)]
    compiled = jax.jit(functools.partial(_causal, implementation=backend.name)).lower(*shapes, None).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < seq_len * seq_len * 4


_GOOD = [jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16))]


@pytest.mark.parametrize(
    "args, kwargs, needle",
    [
        ([jnp.zeros((8, 4, 16))] + _GOOD[1:], {}, "must be"),
        ([jnp.zeros((1, 8, 5, 16))] + _GOOD[1:], {}, "multiple of KV heads"),
        (_GOOD[:2] + [jnp.zeros((1, 8, 2, 8))], {}, "differ"),
        ([_GOOD[0], jnp.zeros((1, 9, 2, 16)), jnp.zeros((1, 9, 2, 16))], {}, "disagree"),
        (_GOOD, dict(n_init=-1), "n_init"),
        (_GOOD, dict(n_local=0), "n_local"),
        (_GOOD, dict(n_last=-3), "n_last"),
        (_GOOD, dict(n_local=8.5), "n_local must be an int"),
        (_GOOD, dict(n_init=True), "n_init must be an int"),
        (_GOOD, dict(implementation="cuda"), "cuda"),
    ],
    ids=["rank", "heads", "kv_mismatch", "length_mismatch", "n_init", "n_local", "n_last", "float_size", "bool_size",
         "implementation"],
)
def test_public_triangle_attention_rejects_bad_input(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tmjax.triangle_attention(*args, **{"implementation": "xla", **kwargs})


@pytest.mark.parametrize("length", [0, 9, -2])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_static_length_out_of_range_is_rejected(backend, length):
    with pytest.raises(ValueError, match=f"got {length}"):
        tmjax.triangle_attention(*_GOOD, length=length, implementation=backend.name)
    with pytest.raises(ValueError, match=f"got {length}"):
        tmjax.causal_attention(*_GOOD, length=length, implementation=backend.name)


@pytest.mark.parametrize(
    "length, needle",
    [
        (np.array([8, 9], np.int32), r"got 9"),  # concrete arrays are checked value by value
        (np.array([0, 3]), r"got 0"),
        (np.array([4, 4, 4]), r"shape \[2\]"),
        (np.array([[4], [4]]), r"shape \[2\]"),
        (np.array([4.0, 4.0]), "integer"),
        (True, "int"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_per_row_length_errors_name_the_problem(backend, length, needle):
    two = [jnp.concatenate([x, x]) for x in _GOOD]
    for fn in (tmjax.triangle_attention, tmjax.causal_attention):
        with pytest.raises(ValueError, match=needle):
            fn(*two, length=length, implementation=backend.name)


def poison(x: jax.Array, positions: np.ndarray, value: float) -> jax.Array:
    """``x [B, T, H, D]`` with every entry at ``positions`` (bool ``[B, T]``) set to ``value``."""
    return jnp.where(jnp.asarray(positions)[:, :, None, None], jnp.asarray(value, x.dtype), x)


def assert_only_seeing_rows_change(clean, out, sees: np.ndarray, lengths) -> None:
    """Rows (< length) that see no poisoned key are bit-for-bit ``clean``; rows that see one are
    non-finite in every head (``sees`` bool ``[B, T]``)."""
    clean, out = np.asarray(clean, np.float32), np.asarray(out, np.float32)
    for b, length in enumerate(lengths):
        blind, seeing = ~sees[b, :length], sees[b, :length]
        np.testing.assert_array_equal(out[b, :length][blind], clean[b, :length][blind])
        assert not np.isfinite(out[b, :length][seeing]).any(axis=(-1, -2)).any(), "a row that sees NaN/Inf stayed finite"


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_values_a_row_cannot_see_never_reach_it(backend, value):
    """NaN/Inf in K and V at padded positions and at one real key: rows that cannot see the real key
    are unchanged bit for bit (no 0 * NaN in partial blocks), rows that see it turn non-finite."""
    c, dtype = PADDED, backend.dtype
    backend.require(c.seq_len, c.head_dim)
    lengths, key = (237, 300), 100  # key 100: in the window of rows 100..139 and seen by the last rows
    q, k, v = random_qkv(9, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, dtype)
    padding = np.arange(c.seq_len)[None, :] >= np.asarray(lengths)[:, None]
    at_key = padding | (np.arange(c.seq_len) == key)[None, :]
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)
    traced = jnp.asarray(lengths, jnp.int32)
    for name, target in (("v", 2), ("k", 1)):
        bad = [q, k, v]
        bad[target] = poison(bad[target], at_key, value)
        tri = _triangle(*bad, traced, implementation=backend.name, **sizes)
        sees = np.stack([reference.triangle_mask(c.seq_len, **sizes)[:, key] if L == c.seq_len
                         else np.pad(reference.triangle_mask(L, **sizes)[:, key], (0, c.seq_len - L)) for L in lengths])
        assert_only_seeing_rows_change(_triangle(q, k, v, traced, implementation=backend.name, **sizes), tri, sees, lengths)
        causal = _causal(*bad, traced, implementation=backend.name)
        sees = np.broadcast_to(np.arange(c.seq_len) >= key, (2, c.seq_len))
        assert_only_seeing_rows_change(_causal(q, k, v, traced, implementation=backend.name), causal, sees, lengths)


def poison_entries(x: jax.Array, entries: list[tuple[int, int, int, int]], value: float) -> jax.Array:
    """``x [B, T, H, D]`` with single entries ``(b, t, h, d)`` set to ``value`` (not whole head vectors)."""
    x = np.array(x)
    for entry in entries:
        x[entry] = value
    return jnp.asarray(x)


def assert_only_seeing_heads_change(clean, out, sees: np.ndarray, lengths, heads: np.ndarray) -> None:
    """Like ``assert_only_seeing_rows_change`` for one poisoned KV head: in the query ``heads`` (bool
    ``[Hq]``, its GQA group) each row that sees the key turns non-finite (a NaN key poisons the whole
    row; one NaN value entry may poison only its own output column, as dense attention does); every
    other row and head is bit-for-bit ``clean``."""
    clean, out = np.asarray(clean, np.float32), np.asarray(out, np.float32)
    for b, length in enumerate(lengths):
        hit = sees[b, :length][:, None] & heads[None, :]  # [rows, Hq]
        np.testing.assert_array_equal(out[b, :length][~hit], clean[b, :length][~hit])
        poisoned = ~np.isfinite(out[b, :length]).all(axis=-1)  # [rows, Hq]
        assert poisoned[hit].all(), "a head that sees one NaN/Inf entry stayed finite"


# (tensor, value): one entry of V NaN or Inf, or one entry of K NaN.
SINGLE_ENTRIES = [("v", np.nan), ("v", np.inf), ("k", np.nan)]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_one_non_finite_entry_reaches_exactly_the_rows_that_see_it(backend):
    """A single NaN/Inf entry (one of D) in V or K at a real key that only some rows see, and another at
    a padded position: the rows that see the key turn non-finite in the query heads of that KV head;
    every other row and head is unchanged bit for bit. (Whole poisoned head vectors, as above, cannot
    tell a guard that checks one entry from one that needs all of them.)"""
    c, dtype = PADDED, backend.dtype
    backend.require(c.seq_len, c.head_dim)
    lengths, key, kv_head = (237, 300), 100, 1
    group = c.q_heads // c.kv_heads
    q, k, v = random_qkv(21, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, dtype)
    entries = [(0, key, kv_head, 5), (1, key, kv_head, 5), (0, 250, 0, 3)]  # 250 >= 237: padding of row 0
    heads = np.arange(c.q_heads) // group == kv_head
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)
    traced = jnp.asarray(lengths, jnp.int32)
    tri_sees = np.stack([np.pad(reference.triangle_mask(L, **sizes)[:, key], (0, c.seq_len - L)) for L in lengths])
    causal_sees = np.broadcast_to(np.arange(c.seq_len) >= key, (2, c.seq_len))
    clean_tri = _triangle(q, k, v, traced, implementation=backend.name, **sizes)
    clean_causal = _causal(q, k, v, traced, implementation=backend.name)
    for name, value in SINGLE_ENTRIES:
        bad = {"q": q, "k": k, "v": v}
        bad[name] = poison_entries(bad[name], entries, value)
        tri = _triangle(bad["q"], bad["k"], bad["v"], traced, implementation=backend.name, **sizes)
        assert_only_seeing_heads_change(clean_tri, tri, tri_sees, lengths, heads)
        causal = _causal(bad["q"], bad["k"], bad["v"], traced, implementation=backend.name)
        assert_only_seeing_heads_change(clean_causal, causal, causal_sees, lengths, heads)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_guarded_values_protect_a_kernel_that_multiplies_v_as_it_is(value):
    """mosaic_gpu and cuDNN use V as it is inside partial tiles; ``guards.guard_values`` prepares K and
    V so that even such a kernel (here dense attention with a mask, which multiplies P by all of V)
    gives exactly the rows that see a poisoned value a non-finite output and leaves the others alone."""
    from tmjax.pallas_kernels import guards

    c, lengths, key = PADDED, (237, 300), 100
    q, k, v = random_qkv(13, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, jnp.float32)
    padding = np.arange(c.seq_len)[None, :] >= np.asarray(lengths)[:, None]
    at_key = padding | (np.arange(c.seq_len) == key)[None, :]
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)
    masks = np.stack([np.pad(reference.triangle_mask(L, **sizes), (0, c.seq_len - L)) for L in lengths])
    masks = np.repeat(masks[:, None], c.q_heads, axis=1)
    attend = jax.jit(lambda k, v: reference.masked_attention(q, *guards.guard_values(k, v, jnp.asarray(lengths)), masks))
    clean = attend(k, v)
    sees = masks[:, 0, :, key]
    for bad in ((k, poison(v, at_key, value)), (poison(k, at_key, value), v)):
        assert_only_seeing_rows_change(clean, attend(*bad), sees, lengths)
    unguarded = reference.masked_attention(q, k, poison(v, at_key, value), masks)
    assert not np.isfinite(np.asarray(unguarded)[0, : key]).all(), "the stand-in kernel does leak 0 * NaN"


def test_guard_runs_only_when_a_value_is_not_finite():
    """``guards.guarded(..., "nonfinite")`` hands the body K and V as they are while every value is finite
    (padding garbage included: the body sees it unzeroed), and ``guard_values``' K and V as soon as one
    entry of V is NaN or Inf (anywhere, padding included); ``"always"`` guards either way."""
    from tmjax.pallas_kernels import guards

    c, lengths = PADDED, jnp.asarray((237, 300), jnp.int32)
    q, k, v = random_qkv(14, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, jnp.float32)
    padding = np.arange(c.seq_len)[None, :] >= np.asarray(lengths)[:, None]
    v = poison(v, padding, 1e4)  # finite garbage in the padding
    spy = jax.jit(lambda k, v, when: guards.guarded(lambda k, v: (k, v), k, v, lengths, when), static_argnums=2)
    as_is = spy(k, v, "nonfinite")
    for got, want in zip(as_is, (k, v)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for bad_v in (v, poison(v, padding & (np.arange(c.seq_len) == 250)[None, :], np.nan),
                  poison_entries(v, [(1, 7, 0, 3)], np.inf)):
        want = guards.guard_values(k, bad_v, lengths)
        for when in ("always", "nonfinite") if bad_v is not v else ("always",):
            for got, expected in zip(spy(k, bad_v, when), want):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    with pytest.raises(ValueError, match="when must be one of"):
        guards.guarded(lambda k, v: v, k, v, lengths, "never")


def test_skipping_the_guard_for_finite_values_changes_no_real_row():
    """Finite inputs with large garbage in the padding: the xla backend gives rows before their length
    bit for bit the same output whether K and V were guarded or not (a masked weight is exactly 0)."""
    from tmjax.pallas_kernels import xla

    c, lengths = PADDED, (237, 300)
    q, k, v = random_qkv(15, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, jnp.float32)
    padding = np.arange(c.seq_len)[None, :] >= np.asarray(lengths)[:, None]
    k, v = poison(k, padding, -3e3), poison(v, padding, 1e4)
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)
    traced = jnp.asarray(lengths, jnp.int32)
    runs = {}
    for when in ("always", "nonfinite"):
        tuning = xla.Tuning(guard=when)
        runs[when] = [np.asarray(f(q, k, v, length=traced, implementation="xla", tuning=tuning))
                      for f in (functools.partial(tmjax.triangle_attention, **sizes), tmjax.causal_attention)]
    for got, want in zip(runs["nonfinite"], runs["always"]):
        for b, length in enumerate(lengths):
            np.testing.assert_array_equal(got[b, :length], want[b, :length])
            assert np.isfinite(got[b, :length]).all()


BOTH_WAYS_CASES = {**{f"causal-{n}": c for n, c in CAUSAL_CASES.items()},
                   **{f"triangle-{n}": TRIANGLE_CASES[n] for n in ("ragged", "longer", "no_sinks_no_last_rows",
                                                                   "diagonal_only_window")}}


@pytest.mark.parametrize("fused", [False, True], ids=["xla-loop", "cpu-fused"])
@pytest.mark.parametrize("case", list(BOTH_WAYS_CASES.values()), ids=list(BOTH_WAYS_CASES))
def test_xla_passes_both_ways_against_dense(case, fused):
    """The xla backend's causal and band passes have two bodies on the CPU: the XLA loops (every platform)
    and the fused host kernel (``cpu_fused``, ``Tuning.fused``: the CPU table's default). Each, forced by
    its tuning, against dense float32 under the recomputed mask (causal, or the triangle: its band is
    the fused pass, its last rows XLA's) with per-row lengths (one row shorter than a fused query block),
    and one NaN entry of K at a key some rows see: exactly those rows turn non-finite."""
    from tmjax.pallas_kernels import cpu_fused, xla

    if fused and not cpu_fused.available():
        pytest.skip("the fused CPU pass is off: numba is not installed, or scipy's BLAS was loaded with threads")
    if jax.default_backend() != "cpu" or jax.local_device_count() != 1:
        pytest.skip("the fused pass runs on the host, with one CPU device")
    c, triangle = case, case.n_local > 0
    lengths = (min(c.seq_len, 29), c.seq_len)
    q, k, v = random_qkv(7, 2, c.seq_len, c.q_heads, c.kv_heads, c.head_dim, jnp.float32)
    tuning = dataclasses.replace(xla.Tuning(), fused=fused, chunk=128, query_chunk=64)
    sizes = dict(n_init=c.n_init, n_local=c.n_local, n_last=c.n_last)

    def attend(q, k, v):
        if triangle:
            return tmjax.triangle_attention(q, k, v, length=jnp.asarray(lengths), implementation="xla",
                                            tuning=tuning, **sizes)
        return tmjax.causal_attention(q, k, v, length=jnp.asarray(lengths), implementation="xla", tuning=tuning)

    run = jax.jit(attend)
    masks = [reference.triangle_mask(n, **sizes) if triangle else reference.causal_mask(n) for n in lengths]
    got = np.asarray(run(q, k, v))
    for b, n in enumerate(lengths):
        want = np.asarray(_reference(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], masks[b]))[0]
        np.testing.assert_allclose(got[b, :n], want, rtol=2e-5, atol=2e-5)
    key = c.seq_len // 3
    poisoned = np.asarray(run(q, k.at[1, key, 0, 1].set(jnp.nan), v))
    group = c.q_heads // c.kv_heads
    finite = np.isfinite(poisoned[1]).all(axis=-1)  # [T, Hq]
    sees = masks[1][:, key]
    assert not finite[sees, :group].any() and finite[~sees].all() and finite[:, group:].all()
    np.testing.assert_array_equal(poisoned[0], got[0])
