"""Randomized attention sweep: seeded cases drawn from the documented space of the public attention
API, each checked against dense float32 attention under a mask recomputed independently.

Used by ``tests/test_sweep.py`` (CPU: xla, and the triton/tpu kernels interpreted, small shapes) and
``bench/gpu_sweep.py`` (GPU: mosaic_gpu, triton, xla, cuDNN). One failing case prints as a command that
rebuilds exactly it: ``python tests/sweep_cases.py IMPLEMENTATION "Case(...)"``.

**Pool design.** Compilation dominates (a Pallas kernel compiles in ~0.5-3 s per static signature, an
interpreted one on CPU in ~2-4 s; a run takes milliseconds). So a ``Signature`` fixes everything a
backend compiles for (pattern and its static keywords, B, T, Hq, Hkv, D, dtype, and the form of
``length``: None, a static int, a traced int32 scalar or a traced int32 ``[B]``), is compiled once per
backend, and runs several ``Case``s that vary only what is traced: the data (seeded), the scale of q,
the true lengths (traced forms; drawn from the signature's short menu, so that host-side masks are
reused), and NaN/Inf poisoning. T comes from a short pool (``Space.seq_lens``, mostly not multiples of
64); B, heads, head_dim, dtype, length form and the pattern's static keywords are drawn per signature.
Each case's reference (and its host-side masks) is computed once and shared by every backend that
takes the signature. Big-T signatures get fewer rows and heads (``Space.max_mask``, ``max_reference``,
``max_data`` bound the host's mask work, the reference's memory and the host's random draws).
``sweep`` draws new signatures (interleaved over patterns) while its time budget also covers, at the
measured cost of a case, topping up every backend x pattern to its target count; then it tops them up
with more cases of signatures already compiled (no compilation), then goes back to new signatures
until the budget is spent.

**Checks per case and backend:** the rows below each row's length are finite; the worst relative L2
error over batch rows (each row's real part, every head) is within ``REL_L2`` of its dtype
(``attention_fixtures``; the contract's bounds); and, when the case is poisoned (NaN, +Inf or -Inf in
Q/K/V past each row's length and in K and/or V at a few real keys), every (row, head) whose mask
misses the poisoned keys is bit-for-bit the clean run's and finite.

**Adding a pattern** is one ``register(Pattern(...))``: its public entry point, a draw of its static
keywords, and a function giving the reference masks (``selection_masks`` builds one from a public
selection function and a per-(row, head) mask of ``tmjax.pallas_kernels.reference``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import time
import zlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import tmjax
from tmjax.pallas_kernels import flexprefill, reference, tuning
from attention_fixtures import REL_L2

LENGTH_FORMS = ("none", "int", "scalar", "array")
POISON_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


# ----------------------------------------------------------------------------- the drawn objects


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a backend compiles for; ``static`` holds the pattern's keywords as sorted (name, value)
    pairs. Cases draw their true lengths from ``length_menu`` (a few values, so that host-side masks
    are reused); with ``length_form == "int"`` its one entry is the int passed as ``length``."""

    pattern: str
    static: tuple[tuple[str, Any], ...]
    batch: int
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    length_form: str
    length_menu: tuple[int, ...]

    @property
    def keywords(self) -> dict[str, Any]:
        return dict(self.static)


@dataclasses.dataclass(frozen=True)
class Poison:
    """``value`` (a key of ``POISON_VALUES``) in Q, K and V at every position past a row's length, and
    in ``tensors`` ("k", "v" or "kv") at the real positions ``keys[b]`` of row ``b``."""

    value: str
    tensors: str
    keys: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class Case:
    """One run of a signature; its repr is a Python expression that rebuilds it."""

    signature: Signature
    seed: int
    lengths: tuple[int, ...]
    q_scale: float
    poison: Poison | None = None


# ----------------------------------------------------------------------------- the registries


@dataclasses.dataclass(frozen=True)
class Pattern:
    """One attention pattern of the public API.

    - ``attend(q, k, v, *, length, implementation, **static)``: the public entry point;
    - ``draw_static(rng, seq_len) -> dict``: its static keywords (documented ranges, some beyond T);
    - ``masks(q, k, length, lengths, static) -> bool [B, Hm, T, T]``: the reference masks, ``Hm``
      dividing Hq (query head ``h`` uses mask head ``h * Hm // Hq``); ``length`` is what ``attend``
      got, ``lengths`` the per-row ints; rows at or past a row's length must be all False;
    - ``selection_reads_keys``: the pattern picks its keys from Q and K, so real keys are poisoned in
      V only (poisoned K would change the picks);
    - ``implementations``: the backends that have it (None: every one).
    """

    name: str
    attend: Callable[..., jax.Array]
    draw_static: Callable[[np.random.Generator, int], dict]
    masks: Callable[..., np.ndarray]
    selection_reads_keys: bool = False
    implementations: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A backend as the public API reaches it: ``api_name`` is the ``implementation=`` argument."""

    name: str
    api_name: str | None
    platforms: tuple[str, ...]
    dtypes: tuple[str, ...] | None = ("bfloat16", "float16")  # None: any
    head_dims: tuple[int, ...] | None = (64, 128)  # None: any
    patterns: tuple[str, ...] | None = None  # None: every pattern
    needs_hopper: bool = False

    def takes(self, sig: Signature) -> bool:
        if self.name == "cudnn":  # what tmjax.attention sends to cuDNN
            return sig.dtype in self.dtypes and sig.head_dim % 8 == 0 and sig.head_dim <= 128
        return (self.dtypes is None or sig.dtype in self.dtypes) and (
            self.head_dims is None or sig.head_dim in self.head_dims)

    def available(self) -> bool:
        device = jax.devices()[0]
        if device.platform not in self.platforms:
            return False
        return not self.needs_hopper or str(getattr(device, "compute_capability", "0")).startswith("9")


IMPLEMENTATIONS: dict[str, Implementation] = {
    i.name: i for i in (
        Implementation("xla", "xla", ("cpu", "gpu", "tpu"), dtypes=None, head_dims=None),
        Implementation("triton", "triton", ("cpu", "gpu")),
        Implementation("tpu", "tpu", ("cpu", "tpu")),
        Implementation("mosaic_gpu", "mosaic_gpu", ("gpu",), needs_hopper=True),
        Implementation("cudnn", None, ("gpu",), patterns=("causal",)),
    )
}
PATTERNS: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    PATTERNS[pattern.name] = pattern
    return pattern


def runs(impl: Implementation, pattern: Pattern, sig: Signature) -> bool:
    """Whether ``impl`` is swept on ``sig`` of ``pattern``."""
    return ((impl.patterns is None or pattern.name in impl.patterns)
            and (pattern.implementations is None or impl.name in pattern.implementations)
            and impl.takes(sig))


# ----------------------------------------------------------------------------- draws


def _log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    """An int in ``[low, high]``, log-uniform (small values as likely per octave as large ones)."""
    if high <= low:
        return low
    return int(min(high, math.floor(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


def draw_size(rng: np.random.Generator, seq_len: int, low: int, zero_share: float = 0.0) -> int:
    """A window/budget size from ``low`` to beyond ``seq_len``: ``low`` itself, log-uniform up to T,
    or T and past it (a size that covers everything)."""
    u = rng.random()
    if u < zero_share:
        return 0
    if u < zero_share + 0.1:
        return low
    if u < zero_share + 0.25:
        return seq_len + int(rng.integers(0, 100))
    return _log_uniform(rng, max(low, 1), max(seq_len, low))


def draw_length(rng: np.random.Generator, seq_len: int) -> int:
    """A true length in ``[1, T]``: T, 1, next to a multiple of 64, or uniform."""
    u = rng.random()
    if u < 0.2:
        return seq_len
    if u < 0.3:
        return 1
    if u < 0.45 and seq_len > 64:
        return int(np.clip(64 * rng.integers(1, seq_len // 64 + 1) + rng.integers(-1, 2), 1, seq_len))
    return int(rng.integers(1, seq_len + 1))


def draw_triangle(rng: np.random.Generator, seq_len: int) -> dict:
    n_init = 0 if rng.random() < 0.3 else int(rng.integers(1, 71))
    return dict(n_init=n_init, n_local=draw_size(rng, seq_len, 1), n_last=draw_size(rng, seq_len, 1, zero_share=0.2))


def draw_vertical_slash(rng: np.random.Generator, seq_len: int) -> dict:
    vertical = draw_size(rng, seq_len, 1, zero_share=0.05)
    slash = draw_size(rng, seq_len, 1)
    u = rng.random()
    last_q = 64 if u < 0.5 else (seq_len + int(rng.integers(0, 50)) if u < 0.6 else int(rng.integers(1, 129)))
    return dict(
        vertical=vertical, slash=slash, last_q=last_q,
        force_vertical=0 if vertical == 0 or rng.random() < 0.3 else _log_uniform(rng, 1, min(vertical, 40)),
        force_slash=_log_uniform(rng, 1, min(slash, 120)),  # few forced diagonals leave gaps to get wrong
        selection=str(rng.choice(["group", "head"])),
        guard=False,  # exact masks; the guarded patterns below sweep the guard
    )


def draw_vertical_slash_mass(rng: np.random.Generator, seq_len: int) -> dict:
    """Vertical-slash budgets as caps with ``mass = gamma`` in ``(0, 1]``: 1, tiny (forced entries
    only), or between."""
    u = rng.random()
    gamma = 1.0 if u < 0.15 else 1e-4 if u < 0.25 else round(float(rng.uniform(0.3, 0.99)), 3)
    return dict(draw_vertical_slash(rng, seq_len), mass=gamma)


def draw_vertical_slash_guarded(rng: np.random.Generator, seq_len: int) -> dict:
    """Vertical-slash with the density guard on; small budgets half the time, so that heads fall on
    both sides of the backend's threshold."""
    drawn = dict(draw_vertical_slash(rng, seq_len), guard=True)
    if rng.random() < 0.5:
        drawn.update(vertical=min(drawn["vertical"], 2), slash=min(drawn["slash"], 3),
                     force_vertical=min(drawn["force_vertical"], 1), force_slash=1)
    return drawn


def draw_flexprefill(rng: np.random.Generator, seq_len: int) -> dict:
    """FlexPrefill's options: tau 0 (every head vertical-slash), 1 (every head query-aware) or between
    (sqrt-JS distances lie in [0, 0.83]), blocks of 64-256, vertical-slash caps as drawn for it."""
    u = rng.random()
    tau = 0.0 if u < 0.2 else 1.0 if u < 0.4 else round(float(rng.uniform(0.05, 0.6)), 3)
    vs = draw_vertical_slash(rng, seq_len)
    return dict(
        gamma=1.0 if rng.random() < 0.1 else round(float(rng.uniform(0.3, 0.99)), 3), tau=tau,
        block=int(rng.choice([64, 128, 192, 256])), max_blocks=_log_uniform(rng, 2, 40),
        vertical=vs["vertical"], slash=vs["slash"], force_vertical=vs["force_vertical"], force_slash=vs["force_slash"],
        selection=vs["selection"], guard=False,
    )


# ----------------------------------------------------------------------------- reference masks


@functools.lru_cache(maxsize=16)
def _row_mask(mask_of: Callable[..., np.ndarray], length: int, static: tuple[tuple[str, Any], ...]) -> np.ndarray:
    """``mask_of(length, **static)``, kept for the next case of the signature (lengths repeat)."""
    return mask_of(length, **dict(static))


def _rows_masks(lengths, seq_len: int, mask_of: Callable[..., np.ndarray], static: dict) -> np.ndarray:
    """``[B, 1, T, T]``: row ``b``'s ``mask_of(L_b, **static)`` (``[L_b, L_b]``) in its top-left corner."""
    masks = np.zeros((len(lengths), 1, seq_len, seq_len), bool)
    for b, length in enumerate(lengths):
        masks[b, 0, :length, :length] = _row_mask(mask_of, length, tuple(sorted(static.items())))
    return masks


def triangle_masks(q, k, length, lengths, static) -> np.ndarray:
    return _rows_masks(lengths, q.shape[1], reference.triangle_mask, static)


def causal_masks(q, k, length, lengths, static) -> np.ndarray:
    return _rows_masks(lengths, q.shape[1], reference.causal_mask, static)


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, static: tuple[tuple[str, Any], ...]) -> Callable:
    """``fn(q, k, v?, length, **static)`` jitted once per function and static keywords."""
    return jax.jit(functools.partial(fn, **dict(static)))


def selection_masks(select: Callable, mask_of: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Reference masks of a pattern that selects per (row, selection head): ``select(q, k, *, length,
    **static)`` returns arrays ``[B, H, ...]`` (a public function, e.g. ``tmjax.vertical_slash_indices``);
    ``mask_of(T, L_b, *per_head_arrays)`` is the contract's ``[T, T]`` mask of one row and head
    (e.g. ``reference.vertical_slash_mask``)."""

    def masks(q, k, length, lengths, static) -> np.ndarray:
        if isinstance(length, jax.Array):
            picked = _jitted(select, tuple(sorted(static.items())))(q, k, length=length)
        else:
            picked = _jitted(select, tuple(sorted({**static, "length": length}.items())))(q, k)
        picked = [np.asarray(x) for x in jax.tree_util.tree_leaves(picked)]
        out = np.zeros((q.shape[0], picked[0].shape[1], q.shape[1], q.shape[1]), bool)
        for b, n in enumerate(lengths):
            for h in range(out.shape[1]):
                out[b, h] = mask_of(q.shape[1], n, *(x[b, h] for x in picked))
        return out

    return masks


def flexprefill_attention(q, k, v, *, length, implementation, **options) -> jax.Array:
    """``tmjax.flexprefill_attention`` with the pattern's options as keywords (the sweep's calling form)."""
    return tmjax.flexprefill_attention(q, k, v, tmjax.FlexPrefill(**options), length=length,
                                       implementation=implementation)


def _flexprefill_select(q, k, *, length=None, guard: bool, **options):
    return flexprefill.select(q, k, length=length, **options)


def flexprefill_masks(q, k, length, lengths, static) -> np.ndarray:
    """``flexprefill.mask`` of the selection ``flexprefill.select`` makes on the same inputs."""
    if isinstance(length, jax.Array):
        picked = _jitted(_flexprefill_select, tuple(sorted(static.items())))(q, k, length=length)
    else:
        picked = _jitted(_flexprefill_select, tuple(sorted({**static, "length": length}.items())))(q, k)
    return flexprefill.mask(picked, lengths, q.shape[1], static["block"])


def dense_above(implementation: str) -> float:
    """The density guard's threshold the backend reads here (its tuning table; shapes do not matter yet)."""
    return tuning.dense_above(implementation, q_heads=1, kv_heads=1, head_dim=64, pattern="vertical_slash")


def guarded_masks(masks: Callable[..., np.ndarray], threshold: float) -> Callable[..., np.ndarray]:
    """``masks`` under the density guard at ``threshold`` (``reference.guarded_mask``, per row and head)."""

    def guarded(q, k, length, lengths, static) -> np.ndarray:
        out = masks(q, k, length, lengths, static)
        for b, n in enumerate(lengths):
            for h in range(out.shape[1]):
                out[b, h] = reference.guarded_mask(out[b, h], n, threshold)
        return out

    return guarded


# A selecting pattern names its public selection function and the reference's per-(row, head) mask.
register(Pattern("triangle", tmjax.triangle_attention, draw_triangle, triangle_masks))
register(Pattern("causal", tmjax.causal_attention, lambda rng, seq_len: {}, causal_masks))
def _vertical_slash_indices(q, k, *, guard: bool, **budgets):
    return tmjax.vertical_slash_indices(q, k, **budgets)  # the unguarded picks; guarded_masks adds the guard


_VS_MASKS = selection_masks(_vertical_slash_indices, reference.vertical_slash_mask)
register(Pattern("vertical_slash", tmjax.vertical_slash_attention, draw_vertical_slash, _VS_MASKS,
                 selection_reads_keys=True))
register(Pattern("vertical_slash_mass", tmjax.vertical_slash_attention, draw_vertical_slash_mass, _VS_MASKS,
                 selection_reads_keys=True))
register(Pattern("flexprefill", flexprefill_attention, draw_flexprefill, flexprefill_masks, selection_reads_keys=True))
# The guard's threshold is the backend's: one guarded pattern per threshold, run by the backends that read it.
_BY_THRESHOLD: dict[float, list[str]] = {}
for _name in ("xla", "triton", "tpu", "mosaic_gpu"):
    _BY_THRESHOLD.setdefault(dense_above(_name), []).append(_name)
for _threshold, _names in sorted(_BY_THRESHOLD.items()):
    register(Pattern(f"vertical_slash_guard{_threshold:g}", tmjax.vertical_slash_attention, draw_vertical_slash_guarded,
                     guarded_masks(_VS_MASKS, _threshold), selection_reads_keys=True, implementations=tuple(_names)))


# ----------------------------------------------------------------------------- the space


@dataclasses.dataclass(frozen=True)
class Space:
    """Where signatures are drawn from. ``xla_only_share`` of the signatures take float32 or a head
    dim the Pallas kernels lack (``other_head_dims``); ``max_mask`` bounds ``B x Hm x T^2`` (host
    masks), ``max_reference`` ``B x Hq x T^2`` (the reference's float32 scores) and ``max_data``
    ``B x T x Hq x D`` (the host's random draws)."""

    seq_lens: tuple[int, ...]
    head_pairs: tuple[tuple[int, int], ...]
    max_batch: int = 3
    head_dims: tuple[int, ...] = (64, 128)
    other_head_dims: tuple[int, ...] = (32, 80, 96, 256)
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    xla_only_share: float = 0.2
    length_forms: tuple[float, ...] = (0.15, 0.15, 0.2, 0.5)  # weights of LENGTH_FORMS
    poison_share: float = 0.5
    menu_size: int = 6
    max_mask: float = 1e8
    max_reference: float = 1.2e9
    max_data: float = 4e6


# (Hq, Hkv): GQA ratios 1 to 8, odd and even groups, MHA.
GPU_SPACE = Space(
    seq_lens=(1, 3, 64, 100, 129, 255, 515, 777, 1000, 1536, 2047, 2900, 4096, 4999),
    head_pairs=((1, 1), (2, 1), (3, 1), (4, 4), (5, 1), (6, 1), (6, 2), (7, 1), (8, 1), (8, 2), (9, 3), (12, 4), (16, 2)),
)
CPU_SPACE = Space(
    seq_lens=(1, 5, 64, 65, 130, 200, 333),
    head_pairs=((1, 1), (2, 1), (3, 3), (4, 1), (6, 2), (7, 1), (8, 1)),
    other_head_dims=(16, 40),
    max_mask=2e7, max_reference=3e7, max_data=1e6,
)


def draw_signature(rng: np.random.Generator, pattern: Pattern, space: Space, xla_only: bool = True) -> Signature:
    """One signature of ``pattern``; ``xla_only=False`` keeps to what every backend takes (the Pallas
    dtypes and head dims)."""
    seq_len = int(rng.choice(space.seq_lens))
    if xla_only and rng.random() < space.xla_only_share:
        dtype = str(rng.choice(("float32",) + space.dtypes))
        dims = space.head_dims + space.other_head_dims if dtype == "float32" else space.other_head_dims
    else:
        dtype, dims = str(rng.choice(space.dtypes)), space.head_dims
    head_dim = int(rng.choice(dims))
    static = pattern.draw_static(rng, seq_len)
    for _ in range(50):  # B and heads within the cost bounds; fall back to the smallest
        batch = int(rng.integers(1, space.max_batch + 1))
        q_heads, kv_heads = space.head_pairs[rng.integers(len(space.head_pairs))]
        mask_heads = {"head": q_heads, "group": kv_heads}.get(static.get("selection"), 1)
        if (batch * mask_heads * seq_len ** 2 <= space.max_mask
                and batch * q_heads * seq_len ** 2 <= space.max_reference
                and batch * q_heads * seq_len * head_dim <= space.max_data):
            break
    else:
        batch, (q_heads, kv_heads) = 1, min(space.head_pairs)
    form = str(rng.choice(LENGTH_FORMS, p=np.asarray(space.length_forms) / sum(space.length_forms)))
    menu = {"none": (seq_len,), "int": (draw_length(rng, seq_len),)}.get(form)
    if menu is None:
        menu = tuple(sorted({seq_len} | {draw_length(rng, seq_len) for _ in range(space.menu_size - 1)}))
    return Signature(pattern.name, tuple(sorted(static.items())), batch, seq_len, q_heads, kv_heads, head_dim,
                     dtype, form, menu)


def draw_case(rng: np.random.Generator, sig: Signature, space: Space) -> Case:
    if sig.length_form == "array":
        lengths = tuple(int(rng.choice(sig.length_menu)) for _ in range(sig.batch))
    else:
        lengths = (int(rng.choice(sig.length_menu)),) * sig.batch
    poison = None
    if rng.random() < space.poison_share:
        keys = tuple(tuple(sorted({int(j) for j in rng.integers(0, n, size=rng.integers(1, 3))})) for n in lengths)
        tensors = "v" if PATTERNS[sig.pattern].selection_reads_keys else str(rng.choice(["k", "v", "kv"]))
        poison = Poison(str(rng.choice(list(POISON_VALUES))), tensors, keys)
    q_scale = round(float(math.exp(rng.uniform(math.log(0.5), math.log(3.0)))), 3)
    return Case(sig, int(rng.integers(2**31)), lengths, q_scale, poison)


def draw_signatures(seed: int, patterns: list[str], count: int, space: Space) -> Iterator[Signature]:
    """``count`` signatures per pattern, interleaved across patterns (so that a time budget that runs
    out leaves every pattern with a similar share); each pattern's first one runs on every backend that
    takes the pattern (a sweep in several processes needs every backend x pattern in each). The round
    starts at pattern ``seed mod len(patterns)``: processes with consecutive seeds compile different
    patterns first, so none is last (compiled as the budget runs out) in every process."""
    rngs = {name: np.random.default_rng([seed, _stable_id(name)]) for name in patterns}
    start = seed % len(patterns) if patterns else 0
    order = patterns[start:] + patterns[:start]
    for round_ in range(count):
        for name in order:
            yield draw_signature(rngs[name], PATTERNS[name], space, xla_only=round_ > 0)


def _stable_id(name: str) -> int:
    """A pattern's share of the seed, the same whatever else is registered or swept."""
    return zlib.crc32(name.encode())


# ----------------------------------------------------------------------------- running one case


def host_inputs(case: Case) -> list[np.ndarray]:
    """Clean float32 q ``[B, T, Hq, D]``, k, v ``[B, T, Hkv, D]`` of the case (standard normal, q
    scaled), drawn on the host so that a case is the same on every platform."""
    s = case.signature
    rng = np.random.default_rng(case.seed)
    shapes = ((s.batch, s.seq_len, s.q_heads, s.head_dim),) + ((s.batch, s.seq_len, s.kv_heads, s.head_dim),) * 2
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in shapes)
    return [q * np.float32(case.q_scale), k, v]


def poisoned(case: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Copies of the host inputs with the case's poison written in."""
    s, p = case.signature, case.poison
    padding = np.arange(s.seq_len)[None, :] >= np.asarray(case.lengths)[:, None]
    at_keys = np.zeros_like(padding)
    for b, keys in enumerate(p.keys):
        at_keys[b, list(keys)] = True
    value = np.float32(POISON_VALUES[p.value])
    return [np.where(where[:, :, None, None], value, x) for x, where in (
        (q, padding), (k, padding | (at_keys & ("k" in p.tensors))), (v, padding | (at_keys & ("v" in p.tensors))))]


def _device(arrays: list[np.ndarray], dtype: str) -> list[jax.Array]:
    return [jnp.asarray(x, jnp.dtype(dtype)) for x in arrays]


def length_argument(case: Case):
    """What ``attend`` gets as ``length``: None, a Python int, or a traced int32 scalar / ``[B]``."""
    s = case.signature
    if s.length_form == "none":
        return None
    if s.length_form == "int":
        return s.length_menu[0]
    if s.length_form == "scalar":
        return jnp.int32(case.lengths[0])
    return jnp.asarray(case.lengths, jnp.int32)


@functools.lru_cache(maxsize=None)
def attend_fn(sig: Signature, impl_name: str) -> Callable:
    """The jitted public call for a signature and backend: ``fn(q, k, v, length)`` for traced
    lengths, ``fn(q, k, v)`` for static ones (None or an int, closed over)."""
    pattern, impl = PATTERNS[sig.pattern], IMPLEMENTATIONS[impl_name]
    call = functools.partial(pattern.attend, implementation=impl.api_name, **sig.keywords)
    if sig.length_form in ("scalar", "array"):
        return jax.jit(lambda q, k, v, length: call(q, k, v, length=length))
    fixed = sig.length_menu[0] if sig.length_form == "int" else None
    jitted = jax.jit(lambda q, k, v: call(q, k, v, length=fixed))
    return lambda q, k, v, length: jitted(q, k, v)


@jax.jit
def _reference(q, k, v, masks):
    """Dense float32 attention; ``masks [B, Hm, T, T]`` repeated to the query heads."""
    masks = jnp.repeat(masks, q.shape[2] // masks.shape[1], axis=1)
    return reference.masked_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), masks)


@dataclasses.dataclass
class Prepared:
    """A case's clean inputs, masks and reference, shared by every backend."""

    case: Case
    qkv: list
    bad: list | None
    length: Any
    masks: np.ndarray
    ref: np.ndarray
    blind: np.ndarray | None  # bool [B, T, Hq]: (row, head) pairs that see no poisoned key


def prepare(case: Case) -> Prepared:
    s = case.signature
    host = host_inputs(case)
    q, k, v = _device(host, s.dtype)
    length = length_argument(case)
    masks = PATTERNS[s.pattern].masks(q, k, length, case.lengths, s.keywords)
    ref = np.asarray(_reference(q, k, v, masks), np.float32)
    bad = blind = None
    if case.poison is not None:
        bad = _device(poisoned(case, *host), s.dtype)
        sees = np.zeros((s.batch, masks.shape[1], s.seq_len), bool)
        for b, keys in enumerate(case.poison.keys):
            sees[b] = masks[b][:, :, list(keys)].any(axis=-1)
        blind = ~np.repeat(sees, s.q_heads // masks.shape[1], axis=1).transpose(0, 2, 1)
    return Prepared(case, [q, k, v], bad, length, masks, ref, blind)


@dataclasses.dataclass
class Result:
    case: Case
    implementation: str
    error: float  # worst relative L2 over batch rows (nan when the call raised)
    problem: str = ""  # empty when the case passed

    @property
    def passed(self) -> bool:
        return not self.problem

    def reproduction(self) -> str:
        return f'python tests/sweep_cases.py {self.implementation} "{self.case!r}"'


def check(prep: Prepared, impl_name: str) -> Result:
    """Run one backend on a prepared case and check finiteness, error and poisoning."""
    case, s = prep.case, prep.case.signature
    fn = attend_fn(s, impl_name)
    try:
        out = np.asarray(fn(*prep.qkv, prep.length), np.float32)
        bad_out = None if prep.bad is None else np.asarray(fn(*prep.bad, prep.length), np.float32)
    except Exception as e:  # a documented configuration that raises is a failure, reported as such
        return Result(case, impl_name, float("nan"), f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    errors, problems = [], []
    for b, n in enumerate(case.lengths):
        rows, ref = out[b, :n], prep.ref[b, :n]
        if not np.isfinite(rows).all():
            problems.append(f"row {b}: {int((~np.isfinite(rows).all(axis=(1, 2))).sum())} non-finite positions below length {n}")
        errors.append(float(np.linalg.norm(rows - ref) / np.linalg.norm(ref)))
        if bad_out is not None:
            blind = prep.blind[b, :n]
            changed = ~(bad_out[b, :n] == rows).all(axis=-1) & blind
            if changed.any():
                i, h = np.argwhere(changed)[0]
                problems.append(f"row {b}: poison reached {int(changed.sum())} (position, head) pairs that cannot see it, "
                                f"first position {i} head {h}")
    error = max(errors)
    bound = REL_L2[s.dtype]
    if not error <= bound:
        worst = int(np.nanargmax(np.nan_to_num(errors, nan=np.inf)))
        problems.append(f"relative L2 {error:.2e} > {bound:.0e} (row {worst}, length {case.lengths[worst]})")
    return Result(case, impl_name, error, "; ".join(problems))


# ----------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class Report:
    seed: int
    results: list[Result] = dataclasses.field(default_factory=list)
    first_call_s: dict[str, float] = dataclasses.field(default_factory=dict)  # "impl/pattern" -> compile + first run
    signatures: dict[str, int] = dataclasses.field(default_factory=dict)  # pattern -> signatures run
    signatures_run: dict[str, int] = dataclasses.field(default_factory=dict)  # "impl/pattern" -> signatures
    top_up_cases: int = 0  # cases run on signatures already compiled, to reach the target
    elapsed_s: float = 0.0
    stopped_early: bool = False

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.passed]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            key = f"{r.implementation}/{r.case.signature.pattern}"
            out[key] = out.get(key, 0) + 1
        return out

    def worst(self) -> dict[str, float]:
        """Worst relative L2 per backend / pattern / dtype (NaN-free cases)."""
        out: dict[str, float] = {}
        for r in self.results:
            key = f"{r.implementation}/{r.case.signature.pattern}/{r.case.signature.dtype}"
            if np.isfinite(r.error):
                out[key] = max(out.get(key, 0.0), r.error)
        return out

    def summary(self) -> dict:
        return dict(
            seed=self.seed, device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
            jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            elapsed_s=round(self.elapsed_s, 1), stopped_early=self.stopped_early, signatures=self.signatures,
            signatures_run=self.signatures_run, top_up_cases=self.top_up_cases,
            cases=self.counts(), worst_rel_l2=self.worst(), bounds=REL_L2,
            first_call_s={k: round(v, 1) for k, v in self.first_call_s.items()},
            failures=[dict(implementation=r.implementation, pattern=r.case.signature.pattern, error=r.error,
                           problem=r.problem, reproduction=r.reproduction()) for r in self.failures],
        )


@dataclasses.dataclass
class _Compiled:
    """A signature that has run (so every backend's program for it is compiled): where its next case
    comes from."""

    sig: Signature
    impls: list[Implementation]
    rng: np.random.Generator
    cases: int = 0


def _run_case(entry: _Compiled, space: Space, report: Report, log: Callable[[str], None]) -> float:
    """Run the entry's next case on its backends; returns the seconds it took."""
    t0 = time.monotonic()
    prep = prepare(draw_case(entry.rng, entry.sig, space))
    for impl in entry.impls:
        t1 = time.monotonic()
        result = check(prep, impl.name)
        if entry.cases == 0:
            key = f"{impl.name}/{entry.sig.pattern}"
            report.first_call_s[key] = report.first_call_s.get(key, 0.0) + time.monotonic() - t1
        report.results.append(result)
        if not result.passed:
            log(f"FAIL {impl.name} {entry.sig.pattern}: {result.problem}\n  {result.reproduction()}")
    entry.cases += 1
    return time.monotonic() - t0


class _Costs:
    """Measured seconds per pattern: a signature's first case (its compilations) and its other cases."""

    def __init__(self) -> None:
        self.first: dict[str, list[float]] = {}
        self.case: dict[str, list[float]] = {}

    def add(self, pattern: str, first: bool, seconds: float) -> None:
        (self.first if first else self.case).setdefault(pattern, []).append(seconds)

    def signature(self, pattern: str, cases: int) -> float:
        return float(np.mean(self.first.get(pattern, [0.0]))) + (cases - 1) * self.per_case(pattern)

    def per_case(self, pattern: str) -> float:
        return float(np.mean(self.case.get(pattern, [0.0])))


def sweep(
    seed: int,
    space: Space,
    *,
    patterns: list[str] | None = None,
    implementations: list[str] | None = None,
    signatures: int = 16,
    cases_per_signature: int = 20,
    target: int | None = None,
    budget_s: float = float("inf"),
    log: Callable[[str], None] = lambda line: None,
    progress: Callable[[Report], None] = lambda report: None,
) -> Report:
    """Draw up to ``signatures`` signatures per pattern (interleaved) and run ``cases_per_signature``
    cases of each on every available backend that takes it; nothing new starts once ``budget_s`` is
    spent (checked before every case), nor a signature that the measured costs say would overrun it.

    With ``target`` (cases per backend and pattern), a new signature starts only while the budget
    left also covers topping up every backend x pattern to the target (at 1.5x the measured cost of
    a case); then the top-up runs more cases of signatures already compiled (no compilation), the
    backend x pattern furthest behind first; time left after that goes to new signatures again.
    ``progress(report)`` is called after every signature and every 20 top-up cases."""
    patterns = list(patterns or PATTERNS)
    impls = [i for i in (IMPLEMENTATIONS[n] for n in (implementations or IMPLEMENTATIONS)) if i.available()]
    report, start, compiled, costs = Report(seed), time.monotonic(), [], _Costs()
    elapsed = lambda: time.monotonic() - start  # noqa: E731
    drawn = enumerate(draw_signatures(seed, patterns, signatures, space))
    put_back: list[tuple[int, Signature]] = []  # a signature explore() could not afford, for its next call

    def missing(counts: dict[str, int]) -> dict[str, int]:
        """Cases each pattern still needs for its furthest-behind backend to reach the target."""
        out: dict[str, int] = {}
        for key in report.signatures_run:
            pattern = key.split("/")[1]
            out[pattern] = max(out.get(pattern, 0), target - counts.get(key, 0))
        return out

    def affordable(pattern: str) -> bool:
        left = budget_s - elapsed() - costs.signature(pattern, cases_per_signature)
        if target is not None:
            left -= 1.5 * sum(n * costs.per_case(p) for p, n in missing(report.counts()).items() if n > 0)
        return left > 0

    def explore() -> None:
        while (item := put_back.pop() if put_back else next(drawn, None)) is not None:
            index, sig = item
            if not affordable(sig.pattern):
                put_back.append(item)
                return
            pattern = PATTERNS[sig.pattern]
            here = [i for i in impls if runs(i, pattern, sig)]
            if not here:
                continue
            entry = _Compiled(sig, here, np.random.default_rng([seed, _stable_id(sig.pattern), index // len(patterns)]))
            compiled.append(entry)
            report.signatures[sig.pattern] = report.signatures.get(sig.pattern, 0) + 1
            for impl in here:
                key = f"{impl.name}/{sig.pattern}"
                report.signatures_run[key] = report.signatures_run.get(key, 0) + 1
            while entry.cases < cases_per_signature and elapsed() < budget_s:
                costs.add(sig.pattern, entry.cases == 0, _run_case(entry, space, report, log))
            report.elapsed_s = elapsed()
            log(f"[{report.elapsed_s:6.1f} s] {sig.pattern} x{entry.cases} T={sig.seq_len} B={sig.batch} "
                f"H={sig.q_heads}/{sig.kv_heads} D={sig.head_dim} {sig.dtype} length={sig.length_form} "
                f"{sig.keywords} on {','.join(i.name for i in here)}")
            progress(report)

    def top_up() -> None:
        while elapsed() < budget_s:
            counts = report.counts()
            short = sorted((counts.get(key, 0), key) for key in report.signatures_run if counts.get(key, 0) < target)
            if not short:
                return
            impl_name, pattern = short[0][1].split("/")
            entry = min((e for e in compiled if e.sig.pattern == pattern and impl_name in [i.name for i in e.impls]),
                        key=lambda e: e.cases)
            _run_case(entry, space, report, log)
            report.top_up_cases += 1
            if report.top_up_cases % 20 == 0:
                report.elapsed_s = elapsed()
                progress(report)

    explore()
    if target is not None:
        top_up()
        log(f"[{elapsed():6.1f} s] {report.top_up_cases} top-up cases")
        explore()
    report.stopped_early = elapsed() >= budget_s
    report.elapsed_s = elapsed()
    return report


def main(argv: list[str] | None = None) -> int:
    """Rerun one case: ``python tests/sweep_cases.py IMPLEMENTATION "Case(...)"``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("implementation", choices=list(IMPLEMENTATIONS))
    parser.add_argument("case", help="a Case(...) expression, as a failing sweep prints it")
    args = parser.parse_args(argv)
    case = eval(args.case, {"Case": Case, "Signature": Signature, "Poison": Poison})  # noqa: S307 (a command-line reproduction)
    result = check(prepare(case), args.implementation)
    print(f"{'PASS' if result.passed else 'FAIL'} {args.implementation} relative L2 {result.error:.3e} "
          f"(bound {REL_L2[case.signature.dtype]:.0e}) {result.problem}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
