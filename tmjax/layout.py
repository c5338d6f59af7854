"""Layouts: which attention each decoder layer uses in prefill.

- ``TriangleMix(switch_layer, ...)``: Triangle attention at and above the switch layer; below it dense
  causal attention, or ``shallow=VerticalSlash(...)`` (the paper's TriangleMix + MInference).
- ``VerticalSlash(...)`` on its own: vertical-slash dynamic sparse attention in every layer
  (MInference alone).
- ``FlexPrefill(...)``: FlexPrefill's per-head choice between query-aware key blocks and
  vertical-slash, both sized by the attention mass (alone or as ``TriangleMix(s, shallow=...)``).
  Its estimator is ``tmjax.pallas_kernels.flexprefill``; ``tmjax.flexprefill_attention`` runs it.
- ``None``: dense causal attention everywhere.

``attention_at(layer)`` answers for one layer: ``None`` (dense), a ``TriangleMix`` (its triangle), a
``VerticalSlash`` (its budgets) or a ``FlexPrefill``. Decoding after prefill is always dense over the cache.
"""

from __future__ import annotations

import dataclasses
import math

SELECTIONS = ("group", "head")


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{owner}.{name} must be >= {low}, got {value}")


def _check_number(owner: str, name: str, value: object, low: float, high: float, *, low_open: bool) -> None:
    """``value`` a real number in ``(low, high]`` (``low_open``) or ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{owner}.{name} must be in {interval}, got {value}")


def _check_forced(owner: str, vertical: int, slash: int, force_vertical: int, force_slash: int) -> None:
    """Budgets and forced counts of a vertical-slash selection (forced entries count within the budget)."""
    _check_int(owner, "vertical", vertical, 0)
    _check_int(owner, "slash", slash, 1)
    _check_int(owner, "force_vertical", force_vertical, 0)
    # The main diagonal keeps every row's softmax non-empty.
    _check_int(owner, "force_slash", force_slash, 1)
    if force_vertical > vertical:
        raise ValueError(f"{owner}.force_vertical ({force_vertical}) must be <= vertical ({vertical}): "
                         "forced columns count within the budget")
    if force_slash > slash:
        raise ValueError(f"{owner}.force_slash ({force_slash}) must be <= slash ({slash}): "
                         "forced diagonals count within the budget")


def _check_guard(owner: str, guard: object) -> None:
    if not isinstance(guard, bool):
        raise ValueError(f"{owner}.guard must be a bool, got {guard!r}")


def _check_selection(owner: str, selection: object) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"{owner}.selection must be one of {SELECTIONS}, got {selection!r}")


@dataclasses.dataclass(frozen=True)
class VerticalSlash:
    """MInference's vertical-slash pattern, estimated per sequence from its last ``last_q`` queries.

    Scores ``A = softmax(Q_last K^T / sqrt(D))`` (causal, float32); a column's score is its sum over
    the last rows, a diagonal's (offset ``s = i - j``) the sum along it. Kept: columns
    ``0..force_vertical-1`` and diagonals ``0..force_slash-1``, then the best-scoring ones up to
    ``vertical`` columns and ``slash`` diagonals in all. With ``mass=gamma`` (a number in ``(0, 1]``)
    the budgets become caps: only the best-scoring ones needed to reach ``gamma`` of the estimated
    mass are kept (``tmjax.pallas_kernels.vs_estimate.keep`` and docs/CONTRACTS.md state the rule).
    Budgets beyond the sequence are clipped to it (covering it gives dense causal attention). Query
    ``i`` sees key ``j <= i`` if ``j`` is a kept column or lies in a 64-token key block that a kept
    diagonal crosses within ``i``'s 64-row query block (``tmjax.pallas_kernels.dynamic_tables``
    states the exact rule).

    ``selection="group"`` (default) sums the scores over the query heads of a KV group, so the group
    shares one selection and each K/V tile is read once for all its heads; ``"head"`` selects per
    query head, as MInference does.

    ``guard`` (default on): a head that keeps more than the backend's ``dense_above`` share of its
    causal key blocks runs dense causal instead (``tmjax.pallas_kernels.density``; docs/CONTRACTS.md).
    """

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    force_vertical: int = 30
    force_slash: int = 100
    selection: str = "group"
    mass: float | None = None
    guard: bool = True

    def __post_init__(self) -> None:
        _check_forced("VerticalSlash", self.vertical, self.slash, self.force_vertical, self.force_slash)
        _check_int("VerticalSlash", "last_q", self.last_q, 1)
        _check_selection("VerticalSlash", self.selection)
        _check_guard("VerticalSlash", self.guard)
        if self.mass is not None:
            _check_number("VerticalSlash", "mass", self.mass, 0, 1, low_open=True)

    def check_layers(self, num_layers: int) -> None:
        """Every model accepts vertical-slash in all its layers."""

    def attention_at(self, layer: int) -> VerticalSlash:
        """Vertical-slash in every layer."""
        return self


@dataclasses.dataclass(frozen=True)
class FlexPrefill:
    """FlexPrefill (ICLR 2025), estimated per sequence and selection head from its last ``block`` queries.

    The square-root Jensen-Shannon distance between a pooled estimate of the last query block's
    distribution over ``block``-token key blocks (mean query against mean keys) and the true one
    decides the head: below ``tau`` it is *query-aware*, and each ``block``-row query block keeps key
    block 0, its diagonal block, then the key blocks of highest pooled score until ``gamma`` of that
    row's pooled mass, at most ``max_blocks`` in all; otherwise it is *vertical-slash*: columns and
    diagonals kept by ``VerticalSlash``'s mass rule with ``mass=gamma`` (forced ``force_vertical`` /
    ``force_slash``, caps ``vertical`` / ``slash``). ``tmjax.pallas_kernels.flexprefill`` computes it;
    docs/CONTRACTS.md states the rules. ``selection`` and ``guard`` as in ``VerticalSlash``.
    ``tmjax.flexprefill_attention`` runs it (key-block lists of 64 tokens for every head).
    """

    gamma: float = 0.9
    tau: float = 0.1
    block: int = 128
    max_blocks: int = 1024
    vertical: int = 1000
    slash: int = 6096
    force_vertical: int = 30
    force_slash: int = 100
    selection: str = "group"
    guard: bool = True

    def __post_init__(self) -> None:
        _check_number("FlexPrefill", "gamma", self.gamma, 0, 1, low_open=True)
        _check_number("FlexPrefill", "tau", self.tau, 0, 1, low_open=False)
        _check_int("FlexPrefill", "block", self.block, 64)
        if self.block % 64:
            raise ValueError(f"FlexPrefill.block must be a multiple of 64 (the tables' granularity), got {self.block}")
        _check_int("FlexPrefill", "max_blocks", self.max_blocks, 2)  # key block 0 and the diagonal block
        _check_forced("FlexPrefill", self.vertical, self.slash, self.force_vertical, self.force_slash)
        _check_selection("FlexPrefill", self.selection)
        _check_guard("FlexPrefill", self.guard)

    def check_layers(self, num_layers: int) -> None:
        """Every model accepts FlexPrefill in all its layers."""

    def attention_at(self, layer: int) -> FlexPrefill:
        """FlexPrefill in every layer."""
        return self


@dataclasses.dataclass(frozen=True)
class TriangleMix:
    """Triangle attention at and above ``switch_layer``; below it dense, or ``shallow``.

    A Triangle layer lets query ``i`` of a length-``L`` sequence see key ``j <= i`` when
    ``j < n_init`` (attention sinks), ``i - j < n_local`` (local window, diagonal included) or
    ``i >= L - n_last`` (the last ``n_last`` rows are dense). ``shallow=VerticalSlash(...)`` (or
    ``FlexPrefill(...)``) runs that method in the layers below the switch layer instead of dense attention.
    """

    switch_layer: int
    n_init: int = 8
    n_local: int = 512
    n_last: int = 128
    shallow: VerticalSlash | FlexPrefill | None = None

    def __post_init__(self) -> None:
        _check_int("TriangleMix", "switch_layer", self.switch_layer, 0)
        _check_int("TriangleMix", "n_init", self.n_init, 0)
        _check_int("TriangleMix", "n_local", self.n_local, 1)  # the diagonal
        _check_int("TriangleMix", "n_last", self.n_last, 0)
        if self.shallow is not None and not isinstance(self.shallow, SHALLOW):
            raise ValueError(f"TriangleMix.shallow must be None, a VerticalSlash or a FlexPrefill, got {self.shallow!r}")

    def check_layers(self, num_layers: int) -> None:
        """Raise ``ValueError`` if the switch layer does not exist in a model of ``num_layers`` (and
        whatever the shallow method's own check raises)."""
        if self.switch_layer > num_layers:
            raise ValueError(
                f"TriangleMix.switch_layer={self.switch_layer} is beyond the model's "
                f"{num_layers} layers (use 0..{num_layers}; {num_layers} means no Triangle layer)"
            )
        if self.shallow is not None:
            self.shallow.check_layers(num_layers)

    def is_triangle(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) uses Triangle attention."""
        return layer >= self.switch_layer

    def attention_at(self, layer: int) -> TriangleMix | VerticalSlash | FlexPrefill | None:
        """This layout (a Triangle layer), the shallow pattern, or None (dense)."""
        return self if self.is_triangle(layer) else self.shallow


SHALLOW = (VerticalSlash, FlexPrefill)  # the dynamic methods: alone, or below TriangleMix's switch layer
Layout = TriangleMix | VerticalSlash | FlexPrefill


def check_layout(layout: object) -> None:
    """Raise ``TypeError`` unless ``layout`` is None, a ``TriangleMix``, a ``VerticalSlash`` or a ``FlexPrefill``."""
    if layout is not None and not isinstance(layout, (TriangleMix, *SHALLOW)):
        raise TypeError(
            "layout must be None (dense), a tmjax.TriangleMix, a tmjax.VerticalSlash or a tmjax.FlexPrefill, "
            f"got {type(layout).__name__}"
        )
