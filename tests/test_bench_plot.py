"""``bench/plot.py`` picks each series' rows from a recorded ``bench/attention.py`` run: checked against
rows picked here by their recorded system names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def plot():
    spec = importlib.util.spec_from_file_location("bench_plot", BENCH / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def named(rows: list[dict], system: str, pattern: str) -> list[tuple[int, float]]:
    return sorted((r["n"], r["ms"]) for r in rows if r["system"] == system and r["pattern"] == pattern)


def test_our_series_are_the_rows_the_table_chose(plot):
    """Our backends' series are the rows whose tuning came from the table, whatever tuning their names
    spell (the 2026-12-08 run also times variants of the same backend and pattern); a peer's series is its
    system's rows."""
    rows = json.loads((BENCH / "results/attention-edges-H100-20261208/attention-NVIDIA_H100_80GB_HBM3-20261208-0048.json")
                      .read_text())["rows"]
    table_triangle = "tmjax mosaic_gpu bkv128 st2 chunk4096 items4 guard-nonfinite sinks64"
    assert plot.series_points(rows, "mosaic_gpu", "triangle") == named(rows, table_triangle, "triangle")
    assert len(named(rows, table_triangle, "triangle")) == 2  # 32K and 128K
    assert plot.series_points(rows, "mosaic_gpu", "dense-causal") == named(rows, "tmjax mosaic_gpu causal table",
                                                                          "dense-causal")
    assert plot.series_points(rows, "flash-attn3-jax dense causal", "dense-causal") == named(
        rows, "flash-attn3-jax dense causal", "dense-causal")


def test_older_records_by_that_days_name(plot):
    """A record from before rows said where their tuning came from: the row named for that day's tuning."""
    rows = json.loads((BENCH / "results/attention-NVIDIA_H100_80GB_HBM3-20261123-1621.json").read_text())["rows"]
    picked = plot.series_points(rows, "mosaic_gpu", "triangle")
    assert picked == named(rows, "tmjax mosaic_gpu bkv64 st3 chunk4096", "triangle")
    assert len(picked) == len({r["n"] for r in rows})
