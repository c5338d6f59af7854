"""Gradient probe, calibration and the accuracy harness on SmolLM2-135M-Instruct, in one command.

Steps (``--steps``, default all three, in this order; each reads the folders the earlier ones wrote):

- ``probe``: ``tmjax probe`` on ``PROBE_SEED`` prompts of the probe's tasks -> ``probe-<tag>/``
- ``calibrate``: ``tmjax calibrate`` from that probe, on ``--samples`` prompts from ``CALIBRATION_SEED``
  -> ``calibration-<tag>/``
- ``shallow``: ``tmjax calibrate --shallow <--shallow-method> --switch-layer <the calibrated layer>`` on the
  same prompts -> ``shallow-<tag>/`` (a step of its own so that each fits a 10-minute device call)
- ``eval``: ``tmjax eval`` on seeds 0, 1, ... of every task (the held-out ``prose_recall`` included):
  dense, the probe's layer, the calibrated layouts, and ``--switch-layers`` -> ``accuracy-<tag>/`` and
  ``summary.md`` (probe curve, calibrations, accuracy table with intervals).

Three disjoint seed ranges: the switch layer is never chosen on the prompts it is judged on. Outputs
go under ``--out`` (default ``$OUT``, else bench/results). Defaults are the full SmolLM2 run: 8K tokens
(the model's limit), float32, the portable XLA attention.

    python bench/accuracy.py                                              # GPU: the full run
    python bench/accuracy.py --steps probe,calibrate,shallow,eval --identical 0.90   # + vertical-slash
    python bench/accuracy.py --max-tokens 2048 --samples 40 --identical 0.9 --eval-samples 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jax

from tmjax.calibrate import CALIBRATION_SEED, PROBE_SEED, calibrate_main, recommendation_text
from tmjax.evaluate import eval_main
from tmjax.probe import SECTIONS, probe_main

STEPS = ("probe", "calibrate", "shallow", "eval")


def _tag(max_tokens: int | None) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", jax.devices()[0].device_kind).strip("-").lower()
    length = f"{max_tokens // 1024}k" if max_tokens else "full"
    return f"smollm2-{length}-{device}"


def summary(probe_dir: Path, calibration_dirs: list[Path], eval_dir: Path) -> str:
    """Markdown: the probe's per-layer table and thresholds, the calibration, then the accuracy table."""
    probe = json.loads((probe_dir / "probe.json").read_text())
    ranges = probe.get("threshold_ranges") or [None] * (len(probe["middle_normalised"]) + 1)
    shares = probe.get("middle_share_from") or [float("nan")] * (len(probe["middle_normalised"]) + 1)
    lines = [f"# {probe['model']}: gradient probe, calibration and accuracy", "",
             f"Probe: {probe['num_prompts']} prompts ({', '.join(probe['tasks'])}; "
             f"{min(probe['prompt_tokens'])}-{max(probe['prompt_tokens'])} tokens), loss on the {probe['loss']}, "
             f"{probe['seconds']} s. Recommended switch layer **{probe['recommended_switch_layer']}**: "
             f"{probe['rule']} (threshold {probe['threshold']}).", "",
             "| layer | " + " | ".join(SECTIONS) + " | middle / max | thresholds picking it | middle share from it |",
             "|---|---|---|---|---|---|---|"]
    for layer, norm in enumerate(probe["middle_normalised"]):
        values = " | ".join(f"{probe['sections'][s][layer]:.3e}" for s in SECTIONS)
        picked = "-" if ranges[layer] is None else f"[{ranges[layer][0]:.3f}, {ranges[layer][1]:.3f})"
        lines.append(f"| {layer} | {values} | {norm:.3f} | {picked} | {shares[layer]:.3f} |")
    for folder in (d for d in calibration_dirs if (d / "calibration.json").is_file()):
        report = json.loads((folder / "calibration.json").read_text())
        measured = report["switch"]["measured"] + (report["shallow"]["measured"] if report["shallow"] else [])
        lines += ["", f"Calibration: {report['criterion']['samples']} prompts per configuration "
                  f"({', '.join(report['tasks'])}), {report['dtype']}, {report['seconds']} s, "
                  f"{report['prompts_measured']} prompt answers in all. `{report['command']}`", "",
                  recommendation_text(report), "",
                  "| measured (in order) | identical | 95% interval | mean KL | verdict |", "|---|---|---|---|---|"]
        for m in measured:
            low, high = m["identical_to_dense_interval"]
            verdict = "pass" if m["passed"] else f"fail after {m['samples']}"
            lines.append(f"| {m['config']} | {m['identical_count']}/{m['samples']} | {100 * low:.0f}-{100 * high:.0f}% "
                         f"| {m['first_token_kl_mean']:.2e} | {verdict} |")
    if (eval_dir / "accuracy.json").is_file():
        report = json.loads((eval_dir / "accuracy.json").read_text())
        lines += ["", f"Accuracy: {len(report['samples'])} samples, up to {report['max_tokens']} tokens, "
                  f"{report['dtype']}, {report['seconds']} s.", "",
                  (eval_dir / "accuracy.md").read_text().split("\n", 2)[2]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--tag", default=None, help="folder suffix (default: model, length and device)")
    parser.add_argument("--steps", default="probe,calibrate,eval", help=f"comma-separated, from {','.join(STEPS)}")
    parser.add_argument("--probe-json", default=None,
                        help="use this probe.json instead of probe-<tag>/probe.json (e.g. one probe, two dtypes)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the model's limit (8192)")
    parser.add_argument("--tasks", default=None, help="comma-separated (default: each command's)")
    parser.add_argument("--probe-samples", type=int, default=3, help="probe prompts per task")
    parser.add_argument("--samples", type=int, default=120, help="calibration prompts per configuration")
    parser.add_argument("--identical", default="0.95", help="calibration: required Wilson lower bound")
    parser.add_argument("--max-kl", default="1e-3", help="calibration: required mean first-token KL")
    parser.add_argument("--shallow-method", choices=["vertical-slash", "flexprefill"], default="vertical-slash",
                        help="shallow step: the method whose budgets or masses are calibrated below the layer")
    parser.add_argument("--budgets", default=None, help="shallow step: vertical:slash ladder (default tmjax's)")
    parser.add_argument("--masses", default=None, help="shallow step: a ladder of masses (default tmjax's)")
    parser.add_argument("--resume", action="store_true",
                        help="calibrate and shallow steps: continue a stopped search (tmjax calibrate --resume)")
    parser.add_argument("--start-layer", default=None,
                        help="calibrate step: start the switch-layer search here (tmjax calibrate --start-layer)")
    parser.add_argument("--eval-samples", type=int, default=18, help="evaluation samples per task")
    parser.add_argument("--switch-layers", default=None, help="evaluation: a sweep beside the marked layers")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--implementation", default="xla",
                        help="attention backend, or 'default' for the platform's (GPU kernels)")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps):
        print(f"accuracy.py: error: --steps takes {','.join(STEPS)}, got {args.steps!r}", file=sys.stderr)
        return 1

    tag = args.tag or _tag(args.max_tokens)
    out = Path(args.out)
    probe_dir, calibration_dir, shallow_dir, eval_dir = (out / f"{kind}-{tag}"
                                                         for kind in ("probe", "calibration", "shallow", "accuracy"))
    probe_json = Path(args.probe_json) if args.probe_json else probe_dir / "probe.json"
    common = [*(["--max-tokens", str(args.max_tokens)] if args.max_tokens else []),
              *(["--tasks", args.tasks] if args.tasks else [])]
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    implementation = [] if args.implementation == "default" else ["--implementation", args.implementation]
    if "probe" in steps:
        code = probe_main([*model, *common, "--samples-per-task", str(args.probe_samples), "--seed", str(PROBE_SEED),
                           "--out", str(probe_json.parent)])
        if code:
            return code
    if ("calibrate" in steps or "shallow" in steps) and args.checkpoint is None:
        from tmjax.default_model import smollm2_checkpoint

        args.checkpoint = str(smollm2_checkpoint())
    calibration = [args.checkpoint, *common, "--probe", str(probe_json), "--samples", str(args.samples),
                   "--seed", str(CALIBRATION_SEED), "--identical", args.identical, "--max-kl", args.max_kl,
                   "--dtype", args.dtype, *implementation, *(["--resume"] if args.resume else [])]
    if "calibrate" in steps:
        start = ["--start-layer", args.start_layer] if args.start_layer else []
        code = calibrate_main([*calibration, *start, "--out", str(calibration_dir), "--force"])  # a rerun replaces it
        if code:
            return code
    if "shallow" in steps:
        layer = json.loads((calibration_dir / "calibration.json").read_text())["recommended_switch_layer"]
        code = calibrate_main([*calibration, "--shallow", args.shallow_method, "--switch-layer", str(layer),
                               *(["--budgets", args.budgets] if args.budgets else []),
                               *(["--masses", args.masses] if args.masses else []), "--out", str(shallow_dir), "--force"])
        if code:
            return code
    if "eval" in steps:
        calibrated = [d / "calibration.json" for d in (calibration_dir, shallow_dir) if (d / "calibration.json").is_file()]
        code = eval_main([*model, *common, "--samples-per-task", str(args.eval_samples), "--seed", "0",
                          "--configs", "dense", *(["--switch-layers", args.switch_layers] if args.switch_layers else []),
                          "--probe", str(probe_json), *(arg for path in calibrated for arg in ("--calibration", str(path))),
                          "--dtype", args.dtype, *implementation, "--out", str(eval_dir)])
        if code:
            return code
        (eval_dir / "summary.md").write_text(summary(probe_json.parent, [calibration_dir, shallow_dir], eval_dir))
    print(f"wrote under {out}: {', '.join(steps)} ({tag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
