"""Layouts: which attention each decoder layer uses in prefill.

- ``TriangleMix(switch_layer, ...)``: Triangle attention at and above the switch layer; below it dense
  causal attention, or ``shallow=VerticalSlash(...)`` (the paper's TriangleMix + MInference).
- ``VerticalSlash(...)`` on its own: vertical-slash dynamic sparse attention in every layer
  (MInference alone).
- ``None``: dense causal attention everywhere.

``attention_at(layer)`` answers for one layer: ``None`` (dense), a ``TriangleMix`` (its triangle) or
a ``VerticalSlash`` (its budgets). Decoding after prefill is always dense over the cache.
"""

from __future__ import annotations

import dataclasses

SELECTIONS = ("group", "head")


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{owner}.{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class VerticalSlash:
    """MInference's vertical-slash pattern, estimated per sequence from its last ``last_q`` queries.

    Scores ``A = softmax(Q_last K^T / sqrt(D))`` (causal, float32); a column's score is its sum over
    the last rows, a diagonal's (offset ``s = i - j``) the sum along it. Kept: columns
    ``0..force_vertical-1`` and diagonals ``0..force_slash-1``, then the best-scoring ones up to
    ``vertical`` columns and ``slash`` diagonals in all. Query ``i`` sees key ``j <= i`` if ``j`` is a
    kept column or lies in a 64-token key block that a kept diagonal crosses within ``i``'s 64-row
    query block (``tmjax.pallas_kernels.dynamic_tables`` states the exact rule).

    ``selection="group"`` (default) sums the scores over the query heads of a KV group, so the group
    shares one selection and each K/V tile is read once for all its heads; ``"head"`` selects per
    query head, as MInference does.
    """

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    force_vertical: int = 30
    force_slash: int = 100
    selection: str = "group"

    def __post_init__(self) -> None:
        _check_int("VerticalSlash", "vertical", self.vertical, 0)
        _check_int("VerticalSlash", "slash", self.slash, 1)
        _check_int("VerticalSlash", "last_q", self.last_q, 1)
        _check_int("VerticalSlash", "force_vertical", self.force_vertical, 0)
        # The main diagonal keeps every row's softmax non-empty.
        _check_int("VerticalSlash", "force_slash", self.force_slash, 1)
        if self.force_vertical > self.vertical:
            raise ValueError(
                f"VerticalSlash.force_vertical ({self.force_vertical}) must be <= vertical ({self.vertical}): "
                "forced columns count within the budget"
            )
        if self.force_slash > self.slash:
            raise ValueError(
                f"VerticalSlash.force_slash ({self.force_slash}) must be <= slash ({self.slash}): "
                "forced diagonals count within the budget"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"VerticalSlash.selection must be one of {SELECTIONS}, got {self.selection!r}")

    def check_layers(self, num_layers: int) -> None:
        """Every model accepts vertical-slash in all its layers."""

    def attention_at(self, layer: int) -> VerticalSlash:
        """Vertical-slash in every layer."""
        return self


@dataclasses.dataclass(frozen=True)
class TriangleMix:
    """Triangle attention at and above ``switch_layer``; below it dense, or ``shallow``.

    A Triangle layer lets query ``i`` of a length-``L`` sequence see key ``j <= i`` when
    ``j < n_init`` (attention sinks), ``i - j < n_local`` (local window, diagonal included) or
    ``i >= L - n_last`` (the last ``n_last`` rows are dense). ``shallow=VerticalSlash(...)`` runs
    vertical-slash in the layers below the switch layer instead of dense attention.
    """

    switch_layer: int
    n_init: int = 8
    n_local: int = 512
    n_last: int = 128
    shallow: VerticalSlash | None = None

    def __post_init__(self) -> None:
        _check_int("TriangleMix", "switch_layer", self.switch_layer, 0)
        _check_int("TriangleMix", "n_init", self.n_init, 0)
        _check_int("TriangleMix", "n_local", self.n_local, 1)  # the diagonal
        _check_int("TriangleMix", "n_last", self.n_last, 0)
        if self.shallow is not None and not isinstance(self.shallow, VerticalSlash):
            raise ValueError(f"TriangleMix.shallow must be None or a VerticalSlash, got {self.shallow!r}")

    def check_layers(self, num_layers: int) -> None:
        """Raise ``ValueError`` if the switch layer does not exist in a model of ``num_layers``."""
        if self.switch_layer > num_layers:
            raise ValueError(
                f"TriangleMix.switch_layer={self.switch_layer} is beyond the model's "
                f"{num_layers} layers (use 0..{num_layers}; {num_layers} means no Triangle layer)"
            )

    def is_triangle(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) uses Triangle attention."""
        return layer >= self.switch_layer

    def attention_at(self, layer: int) -> TriangleMix | VerticalSlash | None:
        """This layout (a Triangle layer), the shallow pattern, or None (dense)."""
        return self if self.is_triangle(layer) else self.shallow


Layout = TriangleMix | VerticalSlash


def check_layout(layout: object) -> None:
    """Raise ``TypeError`` unless ``layout`` is None, a ``TriangleMix`` or a ``VerticalSlash``."""
    if layout is not None and not isinstance(layout, (TriangleMix, VerticalSlash)):
        raise TypeError(
            f"layout must be None (dense), a tmjax.TriangleMix or a tmjax.VerticalSlash, got {type(layout).__name__}"
        )
