"""Tuning as data: one JSON table per backend (``tuning_tables/<backend>.json``, shipped with the
package) says which block sizes and pipeline depths a call runs, keyed by device kind, head_dim, GQA
group (query heads per KV head) and pattern (``triangle``, ``causal``, ``vertical_slash``).

A table is a list of entries ``{"device", "head_dim", "group", "pattern", "tuning": {field: value},
"source"}``; a key may be ``"*"`` (any). A call takes the backend's ``Tuning`` defaults, then applies
every entry that matches it, less specific (fewer keys given) first, so a specific entry overrides
only the fields it names. ``source`` says which recorded run measured the entry (``bench/attention.py
--write-tuning`` writes entries from a sweep). The Pallas interpreter (CPU, or
``TMJAX_PALLAS_INTERPRET=1``) is looked up as device ``"interpret"``.

A table's ``density`` list, in the same entry format with ``{"dense_above": x}`` as its fields, holds
the density guard's thresholds (``pallas_kernels.density``; ``dense_above``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from types import ModuleType

import jax

from tmjax.pallas_kernels._common import interpret_mode

PATTERNS = ("triangle", "causal", "vertical_slash")
KEYS = ("device", "head_dim", "group", "pattern")
INTERPRETED = ("triton", "tpu")  # backends that run in the Pallas interpreter off their hardware


@functools.lru_cache(maxsize=None)
def table(backend: str, part: str = "entries") -> tuple[dict, ...]:
    """The entries of ``backend``'s table (``part="density"``: its density thresholds; empty when it has none)."""
    path = resources.files("tmjax.pallas_kernels").joinpath("tuning_tables", f"{backend}.json")
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text()).get(part, ()))


def device_key(backend: str) -> str:
    """The device a call is looked up as: ``"interpret"`` in the Pallas interpreter, else the device
    kind (``jax.devices()[0].device_kind``, e.g. ``NVIDIA H100 80GB HBM3``, ``cpu``)."""
    if backend in INTERPRETED and interpret_mode():
        return "interpret"
    return jax.devices()[0].device_kind


def fields(entries: tuple[dict, ...], *, device: str, head_dim: int, group: int, pattern: str) -> dict:
    """The tuning fields the matching entries set, the most specific last (see the module docstring)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    key = dict(device=device, head_dim=head_dim, group=group, pattern=pattern)
    matching = [e for e in entries if all(e.get(k, "*") in ("*", key[k]) for k in KEYS)]
    merged: dict = {}
    for entry in sorted(matching, key=lambda e: sum(e.get(k, "*") != "*" for k in KEYS)):  # stable: file order
        merged.update(entry["tuning"])
    return merged


def choose(backend: ModuleType, name: str, *, q_heads: int, kv_heads: int, head_dim: int, pattern: str):
    """The ``backend.Tuning`` a call of these shapes runs: its defaults updated by the table."""
    found = fields(table(name), device=device_key(name), head_dim=head_dim, group=q_heads // kv_heads, pattern=pattern)
    return dataclasses.replace(backend.Tuning(), **found)


def dense_above(name: str, *, q_heads: int, kv_heads: int, head_dim: int, pattern: str) -> float:
    """The density guard's threshold for backend ``name`` (1.0, never dense, where its table sets none)."""
    found = fields(table(name, "density"), device=device_key(name), head_dim=head_dim, group=q_heads // kv_heads,
                   pattern=pattern)
    return float(found.get("dense_above", 1.0))
