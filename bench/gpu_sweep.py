"""The randomized attention sweep on a GPU (issue 17): every backend the GPU has (mosaic_gpu on Hopper,
triton, xla, cuDNN for causal) on every registered pattern, cases from ``tests/sweep_cases.py``'s
generator (the CPU test's, at GPU sizes: T up to 4999), each against dense float32 attention under a
recomputed mask, with NaN/Inf poisoning.

Writes ``OUT/sweep-<device>-<date>.json`` (seed, case counts per backend x pattern, worst relative L2
per backend x pattern x dtype, failures with their one-line reproductions, device, jax version, date)
and a markdown table beside it, rewritten after every signature so that a run cut short still leaves
its record. Exit status 1 when a case failed or a backend x pattern stayed below ``--cases``.

    python3 bench/gpu_sweep.py --out "$OUT" [--seed N] [--cases 300] [--budget-s 360]
    python3 bench/gpu_sweep.py --out "$OUT" --merge A.json B.json ...   # one record of several processes


(``bash bench/gpu_check.sh sweep`` runs this on the GPU machine.) New signatures (compilations, a few
cases each) run while the budget left also covers topping up every backend x pattern to ``--cases``
at the measured cost of a case; then the top-up runs more cases of compiled signatures (no
compilation); the rest of ``--budget-s`` goes to new signatures again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402

import sweep_cases as sc  # noqa: E402


def _write(path: pathlib.Path, text: str) -> None:
    """Write whole or not at all (a sibling temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(summary: dict, target: int) -> str:
    lines = [
        f"# Attention sweep on {summary['device']} ({summary['date']})",
        "",
        f"seed {summary['seed']}, jax {summary['jax']}, {summary['elapsed_s']} s"
        f"{' (budget spent: stopped early)' if summary['stopped_early'] else ''}; "
        f"bounds (relative L2): {', '.join(f'{k} {v:g}' for k, v in summary['bounds'].items())}.",
        "",
        "| backend | pattern | cases | signatures | worst rel. L2 (dtype) | failures |",
        "|---|---|---:|---:|---|---:|",
    ]
    failures: dict[str, int] = {}
    for f in summary["failures"]:
        key = f"{f['implementation']}/{f['pattern']}"
        failures[key] = failures.get(key, 0) + 1
    for key, count in sorted(summary["cases"].items()):
        worst = ", ".join(f"{v:.1e} ({k.rsplit('/', 1)[1]})" for k, v in sorted(summary["worst_rel_l2"].items())
                          if k.rsplit("/", 1)[0] == key)
        flag = "" if count >= target else f" (below {target})"
        lines.append(f"| {key.replace('/', ' | ')} | {count}{flag} | {summary['signatures_run'].get(key, 0)} "
                     f"| {worst} | {failures.get(key, 0)} |")
    if summary["failures"]:
        lines += ["", f"## Failures ({len(summary['failures'])}; first 30)", ""]
        for f in summary["failures"][:30]:
            lines += [f"- {f['implementation']} {f['pattern']}: {f['problem']}", f"  `{f['reproduction']}`"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--seed", type=int, default=int(datetime.date.today().strftime("%Y%m%d")))
    parser.add_argument("--cases", type=int, default=300, help="cases per backend x pattern to reach")
    parser.add_argument("--budget-s", type=float, default=360.0, help="seconds of sweeping (compilations included)")
    parser.add_argument("--max-signatures", type=int, default=60, help="signatures per pattern at most")
    parser.add_argument("--first-cases", type=int, default=6, help="cases per new signature (before topping up)")
    parser.add_argument("--patterns", default=",".join(sc.PATTERNS))
    parser.add_argument("--implementations", default=",".join(sc.IMPLEMENTATIONS))
    parser.add_argument("--space", choices=("gpu", "cpu"), default="gpu", help="cpu: the CPU test's small shapes (a dry run)")
    parser.add_argument("--merge", nargs="+", type=pathlib.Path, default=None,
                        help="records of processes that swept side by side (own seeds): write their sum, --cases in all")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out, args.cases)

    device = jax.devices()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{device.device_kind.replace(' ', '_')}-{datetime.datetime.now():%Y%m%d-%H%M}"
    available = [n for n in args.implementations.split(",") if sc.IMPLEMENTATIONS[n].available()]
    print(f"{device.device_kind}: jax {jax.__version__}, seed {args.seed}, backends {available}", flush=True)

    def record(report: sc.Report) -> dict:
        summary = dict(report.summary(), target_cases=args.cases, patterns=args.patterns.split(","),
                       implementations=available)
        _write(args.out / f"{stem}.json", json.dumps(summary, indent=1))
        _write(args.out / f"{stem}.md", markdown(summary, args.cases))
        return summary

    report = sc.sweep(
        args.seed, sc.GPU_SPACE if args.space == "gpu" else sc.CPU_SPACE, patterns=args.patterns.split(","), implementations=available,
        signatures=args.max_signatures, cases_per_signature=args.first_cases, target=args.cases,
        budget_s=args.budget_s, log=lambda line: print(line, flush=True), progress=record,
    )
    summary = record(report)
    print(markdown(summary, args.cases))
    short = [key for key, n in summary["cases"].items() if n < args.cases]
    expected = {f"{i}/{p}" for p in summary["patterns"] for i in available
                if sc.runs(sc.IMPLEMENTATIONS[i], sc.PATTERNS[p], _any_signature(p))}
    short += sorted(expected - set(summary["cases"]))
    if short:
        print(f"below {args.cases} cases: {short}")
    return 1 if summary["failures"] or short else 0


def merge(paths: list[pathlib.Path], out: pathlib.Path, target: int) -> int:
    """One record of sweeps that ran side by side (one process per seed, compiling in parallel): cases,
    signatures and failures summed, worst errors maxed, seeds listed; exit 1 on a failure or a backend
    x pattern below ``target`` cases in all."""
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    total = dict(first, seed=[p["seed"] for p in parts], elapsed_s=max(p["elapsed_s"] for p in parts),
                 stopped_early=any(p["stopped_early"] for p in parts), failures=[f for p in parts for f in p["failures"]],
                 top_up_cases=sum(p["top_up_cases"] for p in parts), processes=len(parts), target_cases=target)
    for field in ("signatures", "signatures_run", "cases", "first_call_s"):
        total[field] = {}
        for p in parts:
            for key, value in p[field].items():
                total[field][key] = total[field].get(key, 0) + value
    total["worst_rel_l2"] = {}
    for p in parts:
        for key, value in p["worst_rel_l2"].items():
            total["worst_rel_l2"][key] = max(total["worst_rel_l2"].get(key, 0.0), value)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{first['device'].replace(' ', '_')}-{first['date'][:10].replace('-', '')}-merged"
    _write(out / f"{stem}.json", json.dumps(total, indent=1))
    text = markdown(total, target).replace(f"seed {total['seed']}", f"{len(parts)} processes side by side, seeds "
                                           + ", ".join(map(str, total["seed"])))
    _write(out / f"{stem}.md", text)
    print(text)
    short = sorted(key for key, n in total["cases"].items() if n < target)
    short += sorted({f"{i}/{p}" for p in first["patterns"] for i in first["implementations"]
                     if sc.runs(sc.IMPLEMENTATIONS[i], sc.PATTERNS[p], _any_signature(p))} - set(total["cases"]))
    if short:
        print(f"below {target} cases: {short}")
    return 1 if total["failures"] or short else 0


def _any_signature(pattern: str) -> sc.Signature:
    """A bf16, head_dim-64 signature of ``pattern``: one every backend of the pattern takes."""
    return sc.Signature(pattern, (), 1, 64, 1, 1, 64, "bfloat16", "none", (64,))


if __name__ == "__main__":
    raise SystemExit(main())
