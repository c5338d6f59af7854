"""Tuning as data: the lookup rule of ``tmjax.pallas_kernels.tuning`` on a hand-made table, the shipped
tables' entries against each backend's ``Tuning``, and the mosaic_gpu entries against the recorded
benchmark runs they cite."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from tmjax import attention
from tmjax.pallas_kernels import tuning

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"

ENTRIES = (
    {"device": "*", "head_dim": "*", "group": "*", "pattern": "*", "tuning": {"a": 1, "b": 1}},
    {"device": "X", "head_dim": 64, "group": "*", "pattern": "*", "tuning": {"a": 3}},
    {"device": "X", "head_dim": "*", "group": "*", "pattern": "*", "tuning": {"b": 2}},
    {"device": "*", "head_dim": "*", "group": 4, "pattern": "causal", "tuning": {"a": 5}},
)


@pytest.mark.parametrize("device, head_dim, group, pattern, expected", [
    ("X", 64, 1, "triangle", {"a": 3, "b": 2}),  # the more specific entry wins, whatever the file order
    ("X", 128, 1, "triangle", {"a": 1, "b": 2}),
    ("Y", 64, 1, "triangle", {"a": 1, "b": 1}),
    ("Y", 64, 4, "causal", {"a": 5, "b": 1}),
    ("X", 64, 4, "causal", {"a": 5, "b": 2}),  # a tie (two keys each): the later entry in the file wins
])
def test_matching_entries_apply_from_least_to_most_specific(device, head_dim, group, pattern, expected):
    assert tuning.fields(ENTRIES, device=device, head_dim=head_dim, group=group, pattern=pattern) == expected


def test_an_unknown_pattern_is_refused():
    with pytest.raises(ValueError, match="pattern must be one of"):
        tuning.fields(ENTRIES, device="X", head_dim=64, group=1, pattern="band")


@pytest.mark.parametrize("name", attention.IMPLEMENTATIONS)
def test_shipped_entries_name_their_backends_fields_and_sources(name):
    """Every entry of a shipped table sets only fields of the backend's ``Tuning`` (which then
    constructs: its own checks pass), uses only the lookup's keys, and says what measured it."""
    module = importlib.import_module(f"tmjax.pallas_kernels.{name}")
    fields = {f.name for f in dataclasses.fields(module.Tuning)}
    entries = tuning.table(name)
    assert entries, f"{name} ships no tuning table"
    for entry in entries:
        assert set(entry) <= set(tuning.KEYS) | {"tuning", "source"}, entry
        assert entry.get("pattern", "*") in tuning.PATTERNS + ("*",)
        assert set(entry["tuning"]) <= fields, entry
        dataclasses.replace(module.Tuning(), **entry["tuning"])
        assert entry["source"].strip()


@pytest.mark.parametrize("run", ["attention-edges-H100-20261208/attention-NVIDIA_H100_80GB_HBM3-20261208-0048.json",
                                 "attention-edges-H100-20261208/attention-NVIDIA_H100_80GB_HBM3-20261208-0050.json"])
def test_mosaic_gpu_triangle_runs_what_the_recorded_figures_measured(run):
    """``implementation=None`` on that device and those shapes runs the tuning of the recorded run's
    fastest mosaic_gpu triangle row at its longest length (the figure the README quotes), as the row
    recorded it."""
    from tmjax.pallas_kernels import mosaic_gpu

    recorded = json.loads((RESULTS / run).read_text())
    shapes = recorded["shapes"]
    longest = max(r["n"] for r in recorded["rows"])
    timed = [r for r in recorded["rows"] if r["n"] == longest and r.get("pattern") == "triangle" and r.get("ms")
             and r.get("implementation") == "mosaic_gpu"]
    fastest = min(timed, key=lambda r: r["ms"])["tuning"]
    found = tuning.fields(tuning.table("mosaic_gpu"), device=recorded["device"], head_dim=shapes["head_dim"],
                          group=shapes["q_heads"] // shapes["kv_heads"], pattern="triangle")
    names = {f.name for f in dataclasses.fields(mosaic_gpu.Tuning)}
    assert not any(v for k, v in fastest.items() if k not in names)  # a field since removed was off there
    assert dataclasses.replace(mosaic_gpu.Tuning(), **found) == mosaic_gpu.Tuning(
        **{k: v for k, v in fastest.items() if k in names})
