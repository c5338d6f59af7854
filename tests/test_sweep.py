"""The randomized attention sweep on CPU: ``sweep_cases``'s generator (the GPU sweep's, at small shapes)
over every registered pattern, on xla and the triton/tpu kernels in the Pallas interpreter; plus checks
that the generator covers the documented space and that the checker fails a wrong kernel.

A failure prints one command per failing case that rebuilds exactly it. ``TMJAX_SWEEP_SEED`` replaces
the fixed seed (to explore; CI keeps the fixed one).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

import tmjax
import sweep_cases as sc

SEED = int(os.environ.get("TMJAX_SWEEP_SEED", "20261204"))
CPU_IMPLEMENTATIONS = ["xla", "triton", "tpu"]
# Per pattern: 3 signatures (one compilation per backend each, ~3-8 s interpreted), 2 for FlexPrefill (its
# estimator compiles longer) and the guarded vertical-slash (one per backend threshold), 5 cases each:
# with the two new patterns the file takes about what it took with 5 signatures of four patterns.
CASES = 5


def _signatures(pattern: str) -> int:
    return 2 if pattern == "flexprefill" or pattern.startswith("vertical_slash_guard") else 3


def _failure_lines(report: sc.Report) -> str:
    return "\n".join(f"{r.implementation} {r.case.signature.pattern}: {r.problem}\n  {r.reproduction()}"
                     for r in report.failures)


@pytest.mark.parametrize("pattern", sorted(sc.PATTERNS))
def test_sweep_matches_dense_reference(pattern):
    has = sc.PATTERNS[pattern].implementations
    impls = [i for i in CPU_IMPLEMENTATIONS if has is None or i in has]  # a guarded pattern: its threshold's backends
    report = sc.sweep(SEED, sc.CPU_SPACE, patterns=[pattern], implementations=impls,
                      signatures=_signatures(pattern), cases_per_signature=CASES)
    assert not report.failures, f"seed {SEED}: {len(report.failures)} failing cases\n{_failure_lines(report)}"
    counts = report.counts()
    for impl in impls:
        if impl == "xla":  # xla takes every signature
            assert counts.get(f"xla/{pattern}", 0) == _signatures(pattern) * CASES, counts
        else:
            assert counts.get(f"{impl}/{pattern}", 0) >= CASES, f"{impl} ran too few cases: {counts}"


def test_generator_is_seeded_and_reproductions_rebuild_the_case():
    first = list(sc.draw_signatures(SEED, sorted(sc.PATTERNS), 20, sc.GPU_SPACE))
    assert first == list(sc.draw_signatures(SEED, sorted(sc.PATTERNS), 20, sc.GPU_SPACE))
    assert first != list(sc.draw_signatures(SEED + 1, sorted(sc.PATTERNS), 20, sc.GPU_SPACE))
    # a pattern's draws do not depend on which other patterns are swept
    alone = list(sc.draw_signatures(SEED, ["vertical_slash"], 20, sc.GPU_SPACE))
    assert alone == [s for s in first if s.pattern == "vertical_slash"]
    rng = np.random.default_rng(0)
    for sig in first:
        case = sc.draw_case(rng, sig, sc.GPU_SPACE)
        assert eval(repr(case), {"Case": sc.Case, "Signature": sc.Signature, "Poison": sc.Poison}) == case


def test_consecutive_seeds_start_their_rounds_at_different_patterns():
    """Side-by-side processes (consecutive seeds) must not all compile the same pattern last."""
    names = sorted(sc.PATTERNS)
    firsts = {next(sc.draw_signatures(seed, names, 1, sc.GPU_SPACE)).pattern for seed in range(SEED, SEED + len(names))}
    assert firsts == set(names)
    lasts = {list(sc.draw_signatures(seed, names, 1, sc.GPU_SPACE))[-1].pattern for seed in range(SEED, SEED + len(names))}
    assert lasts == set(names)


def test_each_patterns_first_signature_runs_on_every_pallas_backend():
    """A sweep split over processes needs each backend x pattern in every process: the first draw of
    every pattern keeps to the Pallas kernels' dtypes and head dims (later draws may be xla-only)."""
    space = sc.GPU_SPACE
    for seed in range(SEED, SEED + 8):
        sigs = list(sc.draw_signatures(seed, sorted(sc.PATTERNS), 3, space))
        for sig in sigs[:len(sc.PATTERNS)]:
            assert sig.dtype in space.dtypes and sig.head_dim in space.head_dims, sig
    later = list(sc.draw_signatures(SEED, sorted(sc.PATTERNS), 40, space))[len(sc.PATTERNS):]
    assert any(sig.dtype == "float32" or sig.head_dim not in space.head_dims for sig in later)


def test_generator_covers_the_documented_space():
    """Over many draws (nothing compiled), every documented corner appears: T not a multiple of 64
    and up to ~5000, B 1-3 with unequal rows, GQA ratios 1-8, head_dim 64/128 and others, every dtype
    and length form, n_init 0-70, n_local 1 and past T, n_last 0 and past T, budgets 0/1 and past T,
    forced counts, both selections, mass 1, tiny and between, FlexPrefill's tau 0 / 1 / between and
    every block, the guard on, every poison."""
    seen = collections.defaultdict(set)
    rng = np.random.default_rng(1)
    for sig in sc.draw_signatures(SEED, sorted(sc.PATTERNS), 400, sc.GPU_SPACE):
        kw, t = sig.keywords, sig.seq_len
        seen["T % 64 != 0"].add(t % 64 != 0)
        seen["T"].add(t)
        seen["B"].add(sig.batch)
        seen["ratio"].add(sig.q_heads // sig.kv_heads)
        seen["D"].add(sig.head_dim)
        seen["dtype"].add(sig.dtype)
        seen["form"].add(sig.length_form)
        if sig.pattern == "triangle":
            seen["n_init"].add(kw["n_init"])
            seen["n_local"].add("1" if kw["n_local"] == 1 else ">= T" if kw["n_local"] >= t else "between")
            seen["n_last"].add("0" if kw["n_last"] == 0 else "> T" if kw["n_last"] > t else "between")
        if sig.pattern == "vertical_slash_mass":
            seen["mass"].add(kw["mass"] if kw["mass"] in (1.0, 1e-4) else "between")
        if sig.pattern == "flexprefill":
            seen["tau"].add(kw["tau"] if kw["tau"] in (0.0, 1.0) else "between")
            seen["block"].add(kw["block"])
        if sig.pattern.startswith("vertical_slash_guard"):
            seen["guard"].add(kw["guard"])
        if sig.pattern == "vertical_slash":
            seen["vertical"].add("0" if kw["vertical"] == 0 else ">= T" if kw["vertical"] >= t else "between")
            seen["slash"].add("1" if kw["slash"] == 1 else ">= T" if kw["slash"] >= t else "between")
            seen["forced"].add((kw["force_vertical"] > 0, kw["force_slash"] > 1))
            seen["selection"].add(kw["selection"])
            seen["last_q > T"].add(kw["last_q"] > t)
        case = sc.draw_case(rng, sig, sc.GPU_SPACE)
        seen["unequal rows"].add(len(set(case.lengths)) > 1)
        seen["length 1"].add(1 in case.lengths)
        if case.poison:
            seen["poison"].add((case.poison.value, case.poison.tensors))
    assert seen["T % 64 != 0"] == {True, False} and max(seen["T"]) >= 4096 and min(seen["T"]) == 1
    assert seen["B"] == {1, 2, 3} and seen["ratio"] == set(range(1, 9))
    assert seen["D"] >= {64, 128, 32, 96} and seen["dtype"] == {"bfloat16", "float16", "float32"}
    assert seen["form"] == set(sc.LENGTH_FORMS)
    assert min(seen["n_init"]) == 0 and max(seen["n_init"]) >= 65 and len(seen["n_init"]) > 30
    assert seen["n_local"] == {"1", ">= T", "between"}
    assert seen["n_last"] == {"0", "> T", "between"} and seen["vertical"] == {"0", ">= T", "between"}
    assert seen["slash"] == {"1", ">= T", "between"} and seen["forced"] == {(a, b) for a in (0, 1) for b in (0, 1)}
    assert seen["mass"] == {1.0, 1e-4, "between"}
    assert seen["tau"] == {0.0, 1.0, "between"} and seen["block"] == {64, 128, 192, 256} and seen["guard"] == {True}
    assert seen["selection"] == {"group", "head"} and seen["last_q > T"] == {True, False}
    assert seen["unequal rows"] == seen["length 1"] == {True, False}
    assert {v for v, _ in seen["poison"]} == set(sc.POISON_VALUES) and {t for _, t in seen["poison"]} == {"k", "v", "kv"}


def test_the_checker_fails_planted_bugs(monkeypatch, capsys):
    """Patterns whose kernel is wrong on purpose (a window one key too wide; NaN from every key,
    padding included, reaching every row) fail, and the printed reproduction fails again."""

    def wide_window(q, k, v, *, n_local, **kw):
        return tmjax.triangle_attention(q, k, v, n_local=n_local + 1, **kw)

    def leaky(q, k, v, **kw):
        spill = (k.sum(axis=(1, 2, 3)) + v.sum(axis=(1, 2, 3)))[:, None, None, None].astype(q.dtype)
        return tmjax.causal_attention(q, k, v, **kw) + 0 * spill

    planted = {  # pattern, and what its failures must say
        "triangle": (sc.Pattern("triangle", wide_window, lambda rng, t: dict(n_init=0, n_local=16, n_last=4),
                                sc.triangle_masks), "relative L2"),
        "causal": (sc.Pattern("causal", leaky, lambda rng, t: {}, sc.causal_masks), "poison reached"),
    }
    space = sc.Space(seq_lens=(100,), head_pairs=((2, 1),), head_dims=(64,), xla_only_share=0.0,
                     length_forms=(1, 0, 0, 0), poison_share=1.0)  # length None: every row is long
    for name, (pattern, says) in planted.items():
        monkeypatch.setitem(sc.PATTERNS, name, pattern)
        report = sc.sweep(SEED, space, patterns=[name], implementations=["xla"], signatures=1, cases_per_signature=3)
        assert report.failures and all(says in r.problem for r in report.failures), report.failures
        command = report.failures[0].reproduction().split(" ", 2)
        assert command[:2] == ["python", "tests/sweep_cases.py"]
        implementation, case = command[2].split(" ", 1)
        assert sc.main([implementation, case.strip('"')]) == 1
        assert "FAIL" in capsys.readouterr().out
