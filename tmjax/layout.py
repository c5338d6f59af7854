"""The TriangleMix layout: which layers use Triangle attention, and the triangle's sizes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TriangleMix:
    """Dense causal attention below ``switch_layer``, Triangle attention at and above it.

    A Triangle layer lets query ``i`` of a length-``L`` sequence see key ``j <= i`` when
    ``j < n_init`` (attention sinks), ``i - j < n_local`` (local window, diagonal included) or
    ``i >= L - n_last`` (the last ``n_last`` rows are dense).
    """

    switch_layer: int
    n_init: int = 8
    n_local: int = 512
    n_last: int = 128

    def __post_init__(self) -> None:
        for name in ("switch_layer", "n_init", "n_local", "n_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TriangleMix.{name} must be an int, got {value!r}")
        if self.switch_layer < 0:
            raise ValueError(f"TriangleMix.switch_layer must be >= 0, got {self.switch_layer}")
        if self.n_init < 0:
            raise ValueError(f"TriangleMix.n_init must be >= 0, got {self.n_init}")
        if self.n_local < 1:
            raise ValueError(f"TriangleMix.n_local must be >= 1 (the diagonal), got {self.n_local}")
        if self.n_last < 0:
            raise ValueError(f"TriangleMix.n_last must be >= 0, got {self.n_last}")

    def check_layers(self, num_layers: int) -> None:
        """Raise ``ValueError`` if the switch layer does not exist in a model of ``num_layers``."""
        if self.switch_layer > num_layers:
            raise ValueError(
                f"TriangleMix.switch_layer={self.switch_layer} is beyond the model's "
                f"{num_layers} layers (use 0..{num_layers}; {num_layers} means all dense)"
            )

    def is_triangle(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) uses Triangle attention."""
        return layer >= self.switch_layer
