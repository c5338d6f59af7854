"""``tmjax eval`` over layouts: ``--configs`` parsing, report names, the Wilson interval on identical
answers, and a run of dense, TriangleMix, vertical-slash and both on a tiny random model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_evaluate import tiny_checkpoint

from tmjax import evaluate
from tmjax.layout import FlexPrefill, TriangleMix, VerticalSlash

Z = 1.959963984540054


def wilson_lower_upper(k: int, n: int) -> tuple[float, float]:
    """Wilson bounds written out from the score-test inversion (centre +- half width)."""
    phat = k / n
    centre = (k + Z * Z / 2) / (n + Z * Z)
    half = Z * np.sqrt(n * phat * (1 - phat) + Z * Z / 4) / (n + Z * Z)
    return centre - half, centre + half


def test_parse_configs_and_names():
    pattern = VerticalSlash(vertical=60, slash=200, force_vertical=8, force_slash=16)
    triangle = dict(n_init=4, n_local=64, n_last=32)
    layouts = evaluate.parse_configs("dense, tm:22,vs,tm:3+vs", triangle=triangle, pattern=pattern)
    assert layouts == [None, TriangleMix(22, **triangle), pattern, TriangleMix(3, **triangle, shallow=pattern)]
    assert [evaluate.config_name(x) for x in layouts] == ["dense", "switch=22", "vertical-slash",
                                                          "switch=3+vertical-slash"]
    for bad in ("tm", "tm:x", "tm:3+tm", "vs:3", "triangle:3", ""):
        with pytest.raises(ValueError, match="--configs: cannot read"):
            evaluate.parse_configs(bad, triangle=triangle, pattern=pattern)
    for layout in layouts[1:]:
        assert evaluate.layout_from_json(json.loads(json.dumps(dataclasses.asdict(layout)))) == layout


def test_summary_intervals_and_targets_line():
    def row(same, kl, score):
        return {"task": "a", "configs": {"dense": {"score": 1.0, "identical_to_dense": True, "first_token_kl": 0.0},
                                         "switch=5": {"score": score, "identical_to_dense": same,
                                                      "first_token_kl": kl}}}

    rows = [row(True, 1e-4, 1.0)] * 29 + [row(False, 2e-3, 0.0)] * 7  # the 29 of 36
    results = evaluate.summarise(rows, ["dense", "switch=5"])
    r = results["switch=5"]
    assert (r["identical_count"], r["samples"]) == (29, 36)
    assert r["identical_to_dense_interval"] == pytest.approx(wilson_lower_upper(29, 36), abs=1e-12)
    assert results["dense"]["identical_to_dense_interval"] == pytest.approx((wilson_lower_upper(36, 36)[0], 1.0))
    table = evaluate.markdown({"results": results, "marks": {"switch=5": "calibrated"}})
    assert "| switch=5 (calibrated) | 80.6 | 80.6 | 81% | 65%-90% |" in table
    assert "29/36 = 81% of greedy answers identical to dense, Wilson 95% interval 65%-90%" in table
    assert "point >= 95%: NOT met, lower bound >= 90%: NOT met" in table
    assert "mean first-token KL 4.7e-04 (target <= 0.001: met)" in table
    assert "gap +19.4 points; target <= 1: NOT met" in table


def test_eval_cli_runs_layouts_side_by_side(tmp_path):
    folder = tiny_checkpoint(tmp_path / "model")
    calibration = tmp_path / "calibration.json"
    calibrated = TriangleMix(3, n_init=4, n_local=64, n_last=32)
    calibration.write_text(json.dumps({"recommended_layout": dataclasses.asdict(calibrated)}))
    out = tmp_path / "out"
    code = evaluate.eval_main([
        "--checkpoint", str(folder), "--tasks", "niah_single,prose_recall", "--samples-per-task", "1",
        "--max-tokens", "1000", "--configs", "vs,tm:2+vs,tm:2", "--vertical", "60", "--slash", "200",
        "--force-vertical", "8", "--force-slash", "16", "--no-guard", "--calibration", str(calibration),
        "--n-init", "4", "--n-local", "64", "--n-last", "32", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert list(report["results"]) == ["dense", "switch=2", "switch=3", "vertical-slash", "switch=2+vertical-slash"]
    assert report["configs"]["vertical-slash"]["vertical"] == 60
    assert report["configs"]["switch=2+vertical-slash"]["shallow"]["slash"] == 200
    assert report["marks"] == {"switch=3": "calibrated"}
    assert "| switch=3 (calibrated) |" in (out / "accuracy.md").read_text()
    assert "At switch=3 (calibrated): " in (out / "accuracy.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0
    for name, r in report["results"].items():
        same = [s["configs"][name]["identical_to_dense"] for s in report["samples"]]
        assert (r["identical_count"], r["samples"]) == (sum(same), len(same))
        assert r["identical_to_dense_interval"] == pytest.approx(wilson_lower_upper(sum(same), len(same)), abs=1e-9)
    # vertical-slash in every layer with 60 columns and 200 diagonals of ~950-token prompts drops much
    # of the middle (unguarded: the guard would run these heads dense): the first token's distribution must move
    assert report["results"]["vertical-slash"]["first_token_kl_mean"] > 1e-6


def test_flexprefill_and_mass_configs(monkeypatch):
    """``fp`` and ``tm:<layer>+fp`` take the FlexPrefill options, ``--mass`` reaches ``vs`` (``tmjax
    eval``'s own parser, its run replaced); names, report order and the JSON round trip cover both."""
    captured = []
    monkeypatch.setattr(evaluate, "_eval", lambda args: captured.append(args) or 0)
    assert evaluate.eval_main(["--configs", "x", "--mass", "0.8", "--gamma", "0.7", "--tau", "0.2", "--block", "64",
                               "--max-blocks", "9", "--vertical", "90", "--slash", "300", "--force-vertical", "5",
                               "--out", "unused"]) == 0
    args = captured[0]
    pattern = evaluate.vertical_slash(args, args.vertical, args.slash, args.mass)
    flex = evaluate.flexprefill(args, args.gamma, args.vertical, args.slash)
    assert pattern == VerticalSlash(vertical=90, slash=300, force_vertical=5, mass=0.8)
    assert flex == FlexPrefill(gamma=0.7, tau=0.2, block=64, max_blocks=9, vertical=90, slash=300, force_vertical=5)
    triangle = dict(n_init=4, n_local=64, n_last=32)
    layouts = evaluate.parse_configs("tm:3+fp,fp,tm:3+vs,vs,tm:3,dense", triangle=triangle, pattern=pattern, flex=flex)
    assert layouts == [TriangleMix(3, **triangle, shallow=flex), flex, TriangleMix(3, **triangle, shallow=pattern),
                       pattern, TriangleMix(3, **triangle), None]
    ordered = sorted(layouts, key=evaluate._order)
    assert [evaluate.config_name(x) for x in ordered] == ["dense", "switch=3", "vertical-slash", "flexprefill",
                                                          "switch=3+vertical-slash", "switch=3+flexprefill"]
    for layout in layouts[:-1]:
        assert evaluate.layout_from_json(json.loads(json.dumps(dataclasses.asdict(layout)))) == layout
    with pytest.raises(ValueError, match="--configs: cannot read 'tm:3\\+xp'"):
        evaluate.parse_configs("tm:3+xp", triangle=triangle, pattern=pattern, flex=flex)
    # one configuration's mass: fp@<gamma>, vs@<mass>
    layouts = evaluate.parse_configs("tm:3+fp@0.95,fp@1,vs@0.5,tm:3+vs@0.25", triangle=triangle, pattern=pattern,
                                     flex=flex)
    assert layouts == [TriangleMix(3, **triangle, shallow=dataclasses.replace(flex, gamma=0.95)),
                       dataclasses.replace(flex, gamma=1.0), dataclasses.replace(pattern, mass=0.5),
                       TriangleMix(3, **triangle, shallow=dataclasses.replace(pattern, mass=0.25))]
    for bad in ("fp@0", "fp@1.5", "fp@x", "tm:3+fp@", "vs@-1", "tm@0.5"):
        with pytest.raises(ValueError, match="--configs: cannot read"):
            evaluate.parse_configs(bad, triangle=triangle, pattern=pattern, flex=flex)


def test_eval_names_several_budgets_of_one_method(tmp_path):
    """Two FlexPrefill masses in one run (one dense reference): each named with its gamma, the others
    keep their plain names, and each name's recorded layout is the one that ran under it."""
    folder = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    code = evaluate.eval_main([
        "--checkpoint", str(folder), "--tasks", "niah_single", "--samples-per-task", "1", "--max-tokens", "600",
        "--configs", "tm:2,tm:2+fp@0.5,tm:2+fp@0.95,tm:2+vs", "--vertical", "60", "--slash", "200",
        "--n-init", "4", "--n-local", "64", "--n-last", "32", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert list(report["results"]) == ["dense", "switch=2", "switch=2+vertical-slash",
                                       "switch=2+flexprefill gamma=0.5", "switch=2+flexprefill gamma=0.95"]
    assert report["configs"]["switch=2+flexprefill gamma=0.5"]["shallow"]["gamma"] == 0.5
    assert report["configs"]["switch=2+flexprefill gamma=0.95"]["shallow"]["gamma"] == 0.95
