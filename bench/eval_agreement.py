"""How often the same configuration gives the same greedy answer in separate runs of ``tmjax eval``.

"Identical to dense" is only as sharp as dense is repeatable: bf16 kernels on a GPU can round differently
from one process to the next (autotuned GEMM algorithms, split reductions), and one flipped token changes
a greedy answer. Given two or more ``accuracy.json`` files over the same samples (same tasks, seeds and
lengths), this prints, for every configuration they share, the share of samples whose output was the
same in each pair of runs and in all of them, with the samples that differed. ``--out`` also writes it
as JSON.

    python bench/eval_agreement.py run1/accuracy.json run2/accuracy.json --out agreement.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def _load(path: str) -> tuple[dict[str, object], dict[tuple, dict[str, str]]]:
    """(configuration name -> its layout, sample key (task, seed, prompt length) -> name -> output text)."""
    report = json.loads(Path(path).read_text())
    return report["configs"], {(s["task"], s["seed"], s["prompt_tokens"]):
                               {name: c["output"] for name, c in s["configs"].items()} for s in report["samples"]}


def agreement(paths: list[str]) -> dict:
    """Per configuration: samples compared, pairwise identical shares, all-runs identical share."""
    loaded = [_load(p) for p in paths]
    runs = [outputs for _, outputs in loaded]
    keys = sorted(set.intersection(*(set(r) for r in runs)))
    if not keys:
        raise ValueError("the runs share no sample (task, seed, prompt length): not the same eval")
    # a name such as "switch=22+flexprefill" says nothing of gamma: compare only identical layouts
    names = sorted(name for name in set.intersection(*(set(r[k]) for r in runs for k in keys))
                   if all(layouts.get(name) == loaded[0][0].get(name) for layouts, _ in loaded))
    result = {}
    for name in names:
        texts = [[run[k][name] for k in keys] for run in runs]
        pairs = {f"{i}-{j}": sum(a == b for a, b in zip(texts[i], texts[j])) / len(keys)
                 for i, j in itertools.combinations(range(len(runs)), 2)}
        differ = [list(k) for n, k in enumerate(keys) if len({t[n] for t in texts}) > 1]
        result[name] = {"samples": len(keys), "pairwise_identical": pairs,
                        "all_identical": 1 - len(differ) / len(keys), "differing_samples": differ}
    return {"runs": paths, "configs": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="accuracy.json files of tmjax eval runs over the same samples")
    parser.add_argument("--out", default=None, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    if len(args.reports) < 2:
        parser.error("give at least two accuracy.json files")
    try:
        result = agreement(args.reports)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a missing file, not JSON, not an accuracy.json
        parser.error(f"cannot compare {args.reports}: {err!r}")
    for i, path in enumerate(args.reports):
        print(f"run {i}: {path}")
    print("| config | samples | identical, each pair of runs | identical in all runs |\n|---|---|---|---|")
    for name, row in result["configs"].items():
        pairs = ", ".join(f"{pair}: {share:.0%}" for pair, share in row["pairwise_identical"].items())
        print(f"| {name} | {row['samples']} | {pairs} | {row['all_identical']:.0%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
