"""Calibration: the Wilson interval against tabulated values and a direct solution of its quadratic,
the stopping rule and the search against hand-built divergence curves (monotone and not), the probe's
threshold ranges against its own rule, and ``tmjax calibrate`` end to end on a tiny random model."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
from test_evaluate import TINY_LAYERS, tiny_checkpoint

from tmjax import api, calibrate, checkpoint, evaluate, probe, tasks
from tmjax.calibrate import Criterion
from tmjax.evaluate import wilson_interval
from tmjax.layout import TriangleMix

Z = 1.959963984540054  # the standard normal's 97.5% quantile, from tables


def wilson_by_roots(k: int, n: int) -> tuple[float, float]:
    """The Wilson bounds as the roots of ``(k/n - p)**2 = Z**2 p (1 - p) / n``, solved by numpy."""
    phat = k / n
    roots = np.roots([1 + Z * Z / n, -(2 * phat + Z * Z / n), phat * phat]).real
    return float(roots.min()), float(roots.max())


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval, no correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (29, 36, 0.65, 0.90),  # the 81% of 36 ("about 65% to 90%", to the percent)
])
def test_wilson_interval_matches_tabulated_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5 if n != 36 else 5e-3)


def test_wilson_interval_solves_its_quadratic():
    rng = np.random.default_rng(0)
    for n in [1, 2, 5, 36, 120, 1000, *rng.integers(3, 500, 20).tolist()]:
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n, int(rng.integers(0, n + 1))} - {-1}):
            assert wilson_interval(k, n) == pytest.approx(wilson_by_roots(k, n), abs=1e-9), (k, n)
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    with pytest.raises(ValueError, match="successes=5, n=4"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="n must be an int"):
        wilson_interval(1, 2.0)


def test_min_samples_is_the_first_n_that_can_pass():
    for target in (0.5, 0.8, 0.9, 0.95, 0.99):
        need = calibrate.min_samples(target)
        assert wilson_by_roots(need, need)[0] >= target > wilson_by_roots(need - 1, need - 1)[0]
    assert calibrate.min_samples(0.95) == 73  # 72 / (72 + 1.96**2) = 0.9493 < 0.95 <= 73 / 76.84
    with pytest.raises(ValueError, match="--samples 72 cannot show --identical 0.95.*--samples >= 73"):
        Criterion(0.95, 1e-3, 72)
    with pytest.raises(ValueError, match="--max-kl"):
        Criterion(0.9, 0.0, 100)


# A hand-built divergence curve: per switch layer, how many of N answers differ from dense (evenly
# spread over the prompts) and the first-token KL of every prompt.
N = 40
CRITERION = Criterion(identical=0.8, max_kl=1e-3, samples=N)


def spread(failures: int) -> set[int]:
    return {i * N // failures for i in range(failures)} if failures else set()


class Curve:
    """``divergence(layout, k)`` for the hand-built curve; records every call."""

    def __init__(self, failures: list[int], kl: list[float]) -> None:
        self.failures, self.kl, self.calls = failures, kl, []

    def __call__(self, layout: TriangleMix, k: int) -> tuple[bool, float]:
        self.calls.append((layout.switch_layer, k))
        return k not in spread(self.failures[layout.switch_layer]), self.kl[layout.switch_layer]

    def passes(self, layer: int) -> bool:
        """The reference verdict over all N prompts, from the test's own Wilson bound."""
        same = N - self.failures[layer]
        return wilson_by_roots(same, N)[0] >= CRITERION.identical and self.kl[layer] <= CRITERION.max_kl

    def decided_after(self, layer: int) -> int:
        """Prompts the stopping rule needs: the first prefix after which no completion passes, or N."""
        wrong = spread(self.failures[layer])
        for seen in range(1, N + 1):
            best = seen - len(wrong & set(range(seen))) + (N - seen)
            if wilson_by_roots(best, N)[0] < CRITERION.identical or seen * self.kl[layer] > CRITERION.max_kl * N:
                return seen
        return N


def run(curve: Curve, start: int | None) -> tuple[int, list[dict]]:
    layers = [TriangleMix(s) for s in range(len(curve.failures))]
    return calibrate.search_layouts(layers, curve, CRITERION, start)


def check_measurements(curve: Curve, measured: list[dict]) -> None:
    """Each verdict is the full run's, reached after exactly the prompts the stopping rule needs."""
    layers = [m["layout"]["switch_layer"] for m in measured]
    assert len(set(layers)) == len(layers)  # no layer measured twice
    for m, layer in zip(measured, layers):
        assert m["passed"] == curve.passes(layer), layer
        assert m["samples"] == (N if m["passed"] else curve.decided_after(layer)), layer
        assert m["identical"] == [k not in spread(curve.failures[layer]) for k in range(m["samples"])]


MONOTONE = Curve(failures=[40, 38, 30, 25, 20, 15, 12, 9, 6, 3, 1, 0],
                 kl=[0.1, 0.05, 0.03, 0.02, 0.01, 8e-3, 6e-3, 4e-3, 3e-3, 2e-3, 5e-4, 1e-5])


@pytest.mark.parametrize("start", [None, 0, 3, 9, 10, 11, 25])
def test_monotone_curve_gives_the_earliest_passing_layer(start):
    # By hand: 37/40 has Wilson lower bound 0.801 >= 0.8 and 36/40 0.770, so layers 9.. pass on
    # identical answers; layer 9's KL 2e-3 > 1e-3 fails it, so the answer is 10.
    assert [MONOTONE.passes(s) for s in range(12)] == [False] * 10 + [True] * 2
    curve = Curve(MONOTONE.failures, MONOTONE.kl)
    chosen, measured = run(curve, start)
    assert chosen == 10
    check_measurements(curve, measured)
    # Far below the boundary a layer is dropped after a few prompts, not N.
    early = [m for m in measured if m["layout"]["switch_layer"] <= 5]
    assert all(m["samples"] < 10 for m in early)
    assert len(curve.calls) == sum(m["samples"] for m in measured)


def test_a_layer_that_fails_only_on_kl_stops_once_the_kl_sum_is_over():
    curve = Curve([0, 0], [5e-3, 0.0])  # KL 5e-3 per prompt: over 1e-3 * 40 after 9 prompts
    chosen, measured = run(curve, 0)
    assert chosen == 1 and measured[0]["samples"] == 9 == curve.decided_after(0)


@pytest.mark.parametrize("start, trace, chosen", [
    (9, [9, 8, 6, 2, 4, 5], 5),
    (11, [11, 10, 8, 4, 6, 5], 5),
    (None, [5, 2, 3, 4], 5),
])
def test_non_monotone_curve_still_recommends_a_measured_pass(start, trace, chosen):
    """Layers 5 and 6 pass, 7 fails, 8.. pass: the search never measures 7 here and stops at 5, whose own
    measurement passes with layer 4 measured to fail."""
    failures = [40, 38, 30, 25, 20, 0, 0, 9, 0, 3, 1, 0]
    curve = Curve(failures, [1e-5] * 12)
    assert [curve.passes(s) for s in range(12)] == [False] * 5 + [True, True, False] + [True] * 4
    got, measured = run(curve, start)
    assert got == chosen
    assert [m["layout"]["switch_layer"] for m in measured] == trace
    check_measurements(curve, measured)


def test_non_monotone_curve_can_hide_an_earlier_pass():
    """An isolated passing layer below failing ones is missed: the answer is later (more dense), and
    still a measured pass next to a measured failure."""
    curve = Curve([40, 30, 20, 0, 20, 20, 9, 3, 0, 0, 0, 0], [1e-5] * 12)
    assert curve.passes(3) and not curve.passes(6)
    chosen, measured = run(curve, 9)
    assert chosen == 7 and [m["layout"]["switch_layer"] for m in measured] == [9, 8, 6, 7]
    check_measurements(curve, measured)


class Halted(BaseException):
    """A stop that no handler in the CLI catches, as a time limit's signal would be: nothing after it runs."""


@pytest.mark.parametrize("stop_after", [1, 9, 45, -1])
def test_a_stopped_search_resumes_from_its_journal(tmp_path, stop_after):
    """A search stopped after ``stop_after`` prompts (-1: one before the end) and resumed from its
    journal chooses what an uninterrupted one does, with the same records, and measures no configuration
    the first run decided."""
    settings = {"identical": 0.8, "samples": N}
    whole = Curve(MONOTONE.failures, MONOTONE.kl)
    chosen, reference = run(whole, 3)
    if stop_after < 0:
        stop_after += len(whole.calls)
    path = tmp_path / "calibration.journal.jsonl"
    layers = [TriangleMix(s) for s in range(len(MONOTONE.failures))]

    def stopping(layout: TriangleMix, k: int) -> tuple[bool, float]:
        if len(first.calls) == stop_after:
            raise Halted
        return first(layout, k)

    first = Curve(MONOTONE.failures, MONOTONE.kl)
    with pytest.raises(Halted):
        calibrate.search_layouts(layers, stopping, CRITERION, 3, journal=calibrate.Journal(path, settings, False))
    with path.open("a") as f:
        f.write('{"config": "half a line')  # a record cut off by the stop
    journal = calibrate.Journal(path, settings, resume=True)  # takes the whole records, drops the cut one
    decided = [json.loads(line)["layout"]["switch_layer"] for line in path.read_text().splitlines()[1:]]
    assert decided == [m["layout"]["switch_layer"] for m in reference[:len(decided)]]
    second = Curve(MONOTONE.failures, MONOTONE.kl)
    again, records = calibrate.search_layouts(layers, second, CRITERION, 3, journal=journal)
    assert again == chosen == 10
    assert [m.get("from_journal", False) for m in records] == [i < len(decided) for i in range(len(records))]
    assert [{k: v for k, v in m.items() if k not in ("seconds", "from_journal")} for m in records] == \
        [{k: v for k, v in m.items() if k != "seconds"} for m in reference]
    assert not {layer for layer, _ in second.calls} & set(decided)
    assert len(first.calls) + len(second.calls) - sum(m["samples"] for m in reference) < 2 * N  # one redone at most
    # the journal now holds every record once (a record appended after the cut-off line would have been
    # glued to it, and lost to the next resume); other settings cannot take it
    later = calibrate.Journal(path, settings, resume=True)
    assert sorted(later.decided) == sorted(calibrate.Journal._key(m["layout"]) for m in reference)
    assert len(path.read_text().splitlines()) == 1 + len(reference)
    with pytest.raises(ValueError, match="other settings"):
        calibrate.Journal(path, {**settings, "samples": N + 1}, resume=True)
    fresh = calibrate.Journal(path, settings, resume=False)  # without --resume: a new journal
    assert fresh.decided == {} and len(path.read_text().splitlines()) == 1
    path.write_text('{"settings": {"identi')  # a stop that cut off even the settings: nothing to take
    cut = calibrate.Journal(path, settings, resume=True)
    assert cut.decided == {} and json.loads(path.read_text()) == {"settings": settings}


def test_search_on_every_threshold_and_start():
    """Threshold predicates on 0..count: the threshold is found, no candidate is tested twice, and the
    number of tests is logarithmic (plain bisection) or logarithmic in the distance from the start."""
    for count in range(0, 17):
        for threshold in range(count + 1):
            for start in [None, -3, *range(count), count + 2]:
                tested = []

                def passes(i: int) -> bool:
                    assert 0 <= i < count
                    tested.append(i)
                    return i >= threshold

                assert calibrate.search(count, passes, start) == threshold
                assert len(tested) == len(set(tested))
                if start is None:
                    assert len(tested) <= math.ceil(math.log2(count + 1))
                else:
                    distance = abs(threshold - min(max(start, 0), max(count - 1, 0)))
                    assert len(tested) <= 2 * math.ceil(math.log2(distance + 1)) + 2


def test_search_certificate_on_random_predicates():
    rng = np.random.default_rng(1)
    for _ in range(300):
        count = int(rng.integers(1, 20))
        truth = rng.random(count) < 0.5
        start = int(rng.integers(0, count)) if rng.random() < 0.7 else None
        seen: dict[int, bool] = {}

        def passes(i: int) -> bool:
            assert i not in seen
            seen[i] = bool(truth[i])
            return seen[i]

        chosen = calibrate.search(count, passes, start)
        assert chosen == count or seen[chosen] is True
        assert chosen == 0 or seen[chosen - 1] is False


def test_budgets_must_grow():
    args = argparse.Namespace(last_q=64, force_vertical=30, force_slash=100, selection="group", guard=True)
    budgets = calibrate.parse_budgets("50:200, 100:200,100:400", args)
    assert [(b.vertical, b.slash) for b in budgets] == [(50, 200), (100, 200), (100, 400)]
    with pytest.raises(ValueError, match="--budgets must grow: 100:300"):
        calibrate.parse_budgets("200:400,100:300", args)
    with pytest.raises(ValueError, match="cannot read '100'"):
        calibrate.parse_budgets("100", args)
    with pytest.raises(ValueError, match="force_vertical"):
        calibrate.parse_budgets("10:200", args)  # fewer columns than the forced 30


def ladder_args(shallow: str, masses: str | None, budgets: str | None = "50:200,100:400") -> argparse.Namespace:
    return argparse.Namespace(shallow=shallow, masses=masses, budgets=budgets, last_q=64, force_vertical=30,
                              force_slash=100, selection="group", tau=0.1, block=128, max_blocks=64, guard=True)


def test_mass_ladders():
    """``--masses`` must grow within (0, 1]; with it (always for flexprefill) the ladder holds one
    layout per mass, capped by the last ``--budgets`` pair; without it vertical-slash keeps budgets."""
    assert calibrate.parse_masses("0.5, 0.8,1") == [0.5, 0.8, 1.0]
    for bad, needle in (("0.8,0.5", "--masses must grow: 0.5 after 0.8"), ("0.5,0.5", "--masses must grow"),
                        ("0,0.5", r"0 is not in \(0, 1\]"), ("1.5", "not in"), ("half", "cannot read 'half'"),
                        ("", "--masses is empty")):
        with pytest.raises(ValueError, match=needle):
            calibrate.parse_masses(bad)
    assert calibrate.shallow_ladder(ladder_args("dense", None, budgets=None)) == []
    for budgets, masses, flag in (("50:200", None, "--budgets"), (None, "0.5", "--masses")):
        with pytest.raises(ValueError, match=f"{flag} needs --shallow vertical-slash or flexprefill"):
            calibrate.shallow_ladder(ladder_args("dense", masses, budgets=budgets))
    assert [(b.vertical, b.slash, b.mass) for b in calibrate.shallow_ladder(ladder_args("vertical-slash", None))] == \
        [(50, 200, None), (100, 400, None)]
    masses = calibrate.shallow_ladder(ladder_args("vertical-slash", "0.6,0.9"))
    assert [(b.vertical, b.slash, b.mass) for b in masses] == [(100, 400, 0.6), (100, 400, 0.9)]
    flex = calibrate.shallow_ladder(ladder_args("flexprefill", None))
    assert [f.gamma for f in flex] == calibrate.parse_masses(calibrate.DEFAULT_MASSES)
    assert {(f.vertical, f.slash, f.max_blocks, f.tau) for f in flex} == {(100, 400, 64, 0.1)}
    assert evaluate.detailed_name(TriangleMix(3, shallow=flex[1])) == "switch=3+flexprefill gamma=0.7"
    assert evaluate.detailed_name(TriangleMix(3, shallow=masses[0])) == "switch=3+vertical-slash 100:400 mass=0.6"


def test_search_over_a_flexprefill_ladder():
    """The shallow search on FlexPrefill layouts with an injected divergence: the smallest passing
    gamma, each measured once, labelled with its gamma."""
    ladder = [TriangleMix(3, shallow=f) for f in calibrate.shallow_ladder(ladder_args("flexprefill", "0.5,0.7,0.8,0.9,0.95"))]

    def divergence(layout: TriangleMix, k: int) -> tuple[bool, float]:
        return layout.shallow.gamma >= 0.8, 0.0

    chosen, measured = calibrate.search_layouts(ladder, divergence, CRITERION, None)
    assert ladder[chosen].shallow.gamma == 0.8
    labels = [m["config"] for m in measured]
    assert len(set(labels)) == len(labels) and "switch=3+flexprefill gamma=0.8" in labels
    assert all(m["passed"] == (m["layout"]["shallow"]["gamma"] >= 0.8) for m in measured)


@pytest.mark.parametrize("middle", [
    [1.0, 0.8, 0.5, 0.05, 0.02, 0.01],
    [0.2, 1.0, 0.05, 0.5, 0.01, 0.0],
    [0.55, 1.0, 0.67, 0.78, 0.61, 0.65, 0.58, 0.65, 0.7, 0.46, 0.37, 0.43, 0.46, 0.3, 0.51, 0.39, 0.36, 0.37,
     0.24, 0.3, 0.16, 0.1, 0.09, 0.055, 0.041, 0.026, 0.021, 0.016, 0.009, 0.0],
    [0.0, 0.0, 0.0],
])
def test_threshold_ranges_agree_with_the_rule(middle):
    ranges = probe.threshold_ranges(middle)
    assert len(ranges) == len(middle) + 1
    for t in np.linspace(0.0005, 0.9995, 1999):
        layer = probe.recommend_switch_layer(middle, float(t))
        assert ranges[layer] is not None and ranges[layer][0] <= t < ranges[layer][1], (t, layer)
        others = [s for s, r in enumerate(ranges) if r is not None and s != layer and r[0] <= t < r[1]]
        assert not others, (t, others)
    share = probe.middle_share_from(middle)
    total = sum(middle)
    expected = [sum(middle[s:]) / total if total else 0.0 for s in range(len(middle) + 1)]
    assert share == pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_calibrate_cli_end_to_end(tiny, tmp_path, capsys):
    """Probe, switch-layer search and shallow vertical-slash budgets on a tiny random model; every
    verdict recomputed from the per-prompt records, and the recommended layout's records from
    ``tmjax.prefill`` logits and ``tmjax.generate`` tokens."""
    out = tmp_path / "out"
    code = calibrate.calibrate_main([
        str(tiny), "--identical", "0.3", "--max-kl", "0.05", "--samples", "4", "--max-tokens", "1000",
        "--tasks", "niah_single,prose_recall", "--n-init", "4", "--n-local", "64", "--n-last", "32",
        "--shallow", "vertical-slash", "--budgets", "60:200,200:600", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "calibration.json").read_text())
    assert (out / "calibration.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "calibration.png"]  # no journal left
    assert printed.startswith(f"recommended: {report['recommendation']['config']}: ")
    criterion = Criterion(**{k: report["criterion"][k] for k in ("identical", "max_kl", "samples")})
    for stage in (report["switch"]["measured"], report["shallow"]["measured"]):
        for m in stage:
            same, seen = sum(m["identical"]), len(m["identical"])
            passes = wilson_by_roots(same, 4)[0] >= 0.3 and np.mean(m["first_token_kl"]) <= 0.05
            assert m["passed"] == (seen == 4 and passes), m["config"]
            assert criterion.verdict(same, seen, sum(m["first_token_kl"])) is not None
            assert m["identical_to_dense_interval"] == pytest.approx(wilson_by_roots(same, seen), abs=1e-9)
    # this seeded model and these prompts give a failing and a passing layer, and a passing budget
    assert {m["passed"] for m in report["switch"]["measured"]} == {True, False}
    assert report["recommended_layout"]["shallow"] == report["shallow"]["recommended_budget"] is not None
    switch = report["recommended_switch_layer"]
    verdicts = {m["layout"]["switch_layer"]: m["passed"] for m in report["switch"]["measured"]}
    assert switch == TINY_LAYERS or verdicts[switch]
    assert switch == 0 or not verdicts[switch - 1]
    assert report["probe"]["recommended_switch_layer"] == probe.recommend_switch_layer(
        report["probe"]["middle_normalised"])
    assert report["switch"]["measured"][0]["layout"]["switch_layer"] == min(report["probe"]["recommended_switch_layer"],
                                                                           TINY_LAYERS - 1)
    assert report["prompts_measured"] == len(report["dense_seconds"]) + sum(
        m["samples"] for stage in (report["switch"]["measured"], report["shallow"]["measured"]) for m in stage)
    # The budgets alone at the switch layer found, as a second run would do (compiled programs reused):
    # the same prompts give the same measurements.
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps(report["probe"]))
    again = tmp_path / "again"
    assert calibrate.calibrate_main([
        str(tiny), "--identical", "0.3", "--max-kl", "0.05", "--samples", "4", "--max-tokens", "1000",
        "--tasks", "niah_single,prose_recall", "--n-init", "4", "--n-local", "64", "--n-last", "32",
        "--shallow", "vertical-slash", "--budgets", "60:200,200:600", "--switch-layer", str(switch),
        "--probe", str(probe_file), "--out", str(again)]) == 0
    second = json.loads((again / "calibration.json").read_text())
    assert second["switch"]["measured"] == [] and second["switch"]["given"] == switch
    assert second["recommended_layout"] == report["recommended_layout"]
    drop = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in second["shallow"]["measured"]] == \
        [{k: v for k, v in m.items() if k not in drop} for m in report["shallow"]["measured"]]
    # The measured answers of the recommended switch layer, recomputed with the one-program generate.
    params, tokenizer = checkpoint.load(tiny), checkpoint.tokenizer(tiny)
    samples = tasks.generate_mixed(report["tasks"], total=4, seed=report["seed"], max_tokens=1000,
                                   count=tasks.token_counter(tokenizer))
    assert [(s.task, s.seed) for s in samples] == [(r["task"], r["seed"]) for r in report["samples"]]
    record = next(m for m in report["switch"]["measured"] if m["layout"]["switch_layer"] == min(switch, 3))
    layout = TriangleMix(record["layout"]["switch_layer"], n_init=4, n_local=64, n_last=32)
    for k in range(record["samples"]):
        ids = np.asarray(tasks.encode(tokenizer, samples[k]).prompt_ids, np.int32)
        budget = samples[k].max_new_tokens
        assert budget == 12
        answers = [np.asarray(api.generate(params, ids, budget, x, eos_token_id=tokenizer.eos_token_id))
                   for x in (None, layout)]
        assert record["identical"][k] == bool(np.array_equal(*answers)), k
        # calibrate's cache room (the largest answer budget) reuses its compiled prefills
        p, q = (np.asarray(api.prefill(params, ids, x, max_new_tokens=12)[0], np.float64) for x in (None, layout))
        log_p, log_q = p - np.logaddexp.reduce(p), q - np.logaddexp.reduce(q)
        assert record["first_token_kl"][k] == pytest.approx(float(np.sum(np.exp(log_p) * (log_p - log_q))),
                                                            rel=1e-3, abs=1e-7)


def test_calibrate_cli_resumes_a_stopped_run(tiny, tmp_path, monkeypatch, capsys):
    """``tmjax calibrate`` stopped after its first configuration, then run again with ``--resume``: the
    report an uninterrupted run writes (timings aside), with no configuration and no dense answer
    measured twice; other settings refuse the journal."""
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps({"recommended_switch_layer": 1, "threshold": 0.1,
                                      "middle_normalised": [1.0, 0.5, 0.05, 0.01]}))
    args = [str(tiny), "--identical", "0.3", "--max-kl", "0.05", "--samples", "4", "--max-tokens", "1000",
            "--tasks", "niah_single,prose_recall", "--n-init", "4", "--n-local", "64", "--n-last", "32",
            "--probe", str(probe_file)]
    assert calibrate.calibrate_main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "calibration.json").read_text())
    assert len(whole["switch"]["measured"]) >= 2
    calls: list[tuple[int | None, int]] = []
    greedy = calibrate.Divergence._greedy
    monkeypatch.setattr(calibrate.Divergence, "_greedy", lambda self, k, layout, follow: calls.append(
        (None if layout is None else layout.switch_layer, k)) or greedy(self, k, layout, follow))
    measure = calibrate.measure

    def stops_after_one(*a, **k):
        if any(layer is not None for layer, _ in calls):
            raise Halted  # as a time limit would: nothing after it runs
        return measure(*a, **k)

    out = tmp_path / "resumed"
    monkeypatch.setattr(calibrate, "measure", stops_after_one)
    with pytest.raises(Halted):
        calibrate.calibrate_main([*args, "--out", str(out)])
    first = list(calls)
    assert not (out / "calibration.json").exists() and (out / "calibration.journal.jsonl").is_file()
    monkeypatch.setattr(calibrate, "measure", measure)
    capsys.readouterr()
    assert calibrate.calibrate_main([*args, "--samples", "5", "--resume", "--out", str(out)]) == 1
    assert "was written under other settings (samples: 4 there, 5 here)" in capsys.readouterr().err
    calls.clear()
    assert calibrate.calibrate_main([*args, "--resume", "--out", str(out)]) == 0
    resumed = json.loads((out / "calibration.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "calibration.png"]
    drop = ("seconds", "from_journal")
    for stage in ("switch", "shallow"):
        assert [{k: v for k, v in m.items() if k not in drop} for m in (resumed[stage] or {}).get("measured", [])] == \
            [{k: v for k, v in m.items() if k not in drop} for m in (whole[stage] or {}).get("measured", [])]
    assert resumed["recommended_layout"] == whole["recommended_layout"]
    assert [m.get("from_journal", False) for m in resumed["switch"]["measured"]] == \
        [True] + [False] * (len(whole["switch"]["measured"]) - 1)
    decided = {layer for layer, _ in first if layer is not None}
    assert not {layer for layer, _ in calls} & decided  # the journal's configuration is not measured again
    assert not {k for layer, k in calls if layer is None} & {k for layer, k in first if layer is None}


def test_calibrate_cli_starts_the_search_where_told(tiny, tmp_path):
    """``--start-layer`` replaces the probe's layer as the search's first measurement, and the answer
    keeps its certificate: measured to pass (or all dense), the layer below measured to fail."""
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps({"recommended_switch_layer": 1, "threshold": 0.1,
                                      "middle_normalised": [1.0, 0.5, 0.05, 0.01]}))
    for start in (0, TINY_LAYERS - 1):
        out = tmp_path / f"from-{start}"
        assert calibrate.calibrate_main([
            str(tiny), "--identical", "0.3", "--max-kl", "0.05", "--samples", "4", "--max-tokens", "1000",
            "--tasks", "niah_single,prose_recall", "--n-init", "4", "--n-local", "64", "--n-last", "32",
            "--probe", str(probe_file), "--start-layer", str(start), "--out", str(out)]) == 0
        report = json.loads((out / "calibration.json").read_text())
        measured = report["switch"]["measured"]
        assert report["switch"]["start"] == start and measured[0]["layout"]["switch_layer"] == start
        assert report["probe"]["recommended_switch_layer"] == 1
        verdicts = {m["layout"]["switch_layer"]: m["passed"] for m in measured}
        switch = report["recommended_switch_layer"]
        assert switch == TINY_LAYERS or verdicts[switch]
        assert switch == 0 or verdicts[switch - 1] is False


def test_calibrate_cli_refuses_bad_input_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    cases = [
        (["--identical", "0.95", "--samples", "50"], "--samples 50 cannot show --identical 0.95"),
        (["--budgets", "100:400,50:400", "--shallow", "vertical-slash"], "--budgets must grow"),
        (["--tasks", "niah_single,nonsense"], "['nonsense']"),
        (["--n-local", "0"], "n_local must be >= 1"),
        (["--switch-layer", "2"], "--switch-layer leaves nothing to calibrate without --shallow vertical-slash"),
        ([], f"checkpoint {missing} is not a folder"),
    ]
    for extra, message in cases:
        assert calibrate.calibrate_main([missing, *extra, "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tmjax calibrate: error: ") and message in err and err.count("\n") == 1, err
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps({"recommended_switch_layer": 3}))
    assert calibrate.calibrate_main([missing, "--probe", str(probe_file), "--out", str(tmp_path / "out")]) == 1
    assert "lacks ['middle_normalised', 'threshold']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibrate_refuses_bad_arguments_before_any_model_work(tiny, tmp_path, capsys, monkeypatch):
    """Each case one line naming the argument, before the model loads or the probe runs: through the CLI
    in a child process for two of them, in-process with the loading replaced by a failure for all."""
    import subprocess
    import sys

    done = tmp_path / "done"
    done.mkdir()
    (done / "calibration.json").write_text("{}")
    base = [str(tiny), "--samples", "80", "--out", str(tmp_path / "out")]
    cases = [
        (["--shallow", "vertical-slash", "--budgets", "\u00b2:4"], "--budgets: cannot read '\u00b2:4'"),
        (["--shallow", "vertical-slash", "--budgets", "50:200,100:x"], "--budgets: cannot read '100:x'"),
        (["--budgets", "50:200"], "--budgets needs --shallow vertical-slash or flexprefill"),
        (["--masses", "0.5,0.9"], "--masses needs --shallow vertical-slash or flexprefill"),
        (["--shallow", "vertical-slash", "--switch-layer", "99"],
         f"--switch-layer must be in 0..{TINY_LAYERS} (the model has {TINY_LAYERS} layers), got 99"),
        (["--start-layer", str(TINY_LAYERS)],
         f"--start-layer must be in 0..{TINY_LAYERS - 1} (the model has {TINY_LAYERS} layers), got {TINY_LAYERS}"),
        (["--start-layer", "-1"], "--start-layer must be >= 0, got -1"),
        (["--shallow", "vertical-slash", "--switch-layer", "1", "--start-layer", "2"],
         "--start-layer starts the switch-layer search, which --switch-layer skips: pass one"),
        (["--out", str(done)], f"--out {done} already holds a calibration.json; pass --force to replace it"),
    ]
    for extra, needle in cases[:1] + cases[4:5]:
        proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "calibrate", *base, *extra], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 1 and proc.stderr.startswith("tmjax calibrate: error: "), proc.stderr
        assert needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "calibrate", *base, "--implementation", "bogus"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "--implementation: invalid choice: 'bogus'" in proc.stderr, proc.stderr

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(calibrate, "load_model", loaded)
    for extra, needle in cases:
        assert calibrate.calibrate_main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tmjax calibrate: error: ") and needle in err and err.count("\n") == 1, err
    with pytest.raises(AssertionError, match="the model was loaded"):  # --force passes the check
        calibrate.calibrate_main([*base, "--out", str(done), "--force"])
    assert (done / "calibration.json").read_text() == "{}"
