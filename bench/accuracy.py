"""Gradient probe, then the accuracy harness at the probe's switch layer and a sweep, in one command.

Writes ``probe-<tag>/`` (probe.json, probe.png) and ``accuracy-<tag>/`` (accuracy.json, .md, .png and
summary.md, which gathers the probe curve and the accuracy table) under ``--out`` (default ``$OUT``,
else bench/results). The probe's prompts use other seeds than the evaluation's, so the switch layer
is not chosen on the samples it is judged on. Defaults are the full SmolLM2-135M-Instruct run:
8K tokens (the model's limit), float32, the portable XLA attention.

    python bench/accuracy.py                                            # GPU: the full run
    python bench/accuracy.py --max-tokens 2048 --probe-samples 1 \\
        --eval-samples 1 --tasks niah_single,niah_multikey,variable_tracking --switch-layers 8,16,24
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jax

from tmjax.evaluate import eval_main
from tmjax.probe import SECTIONS, probe_main

PROBE_SEED = 1000  # evaluation samples use seeds 0, 1, ...


def _tag(max_tokens: int | None) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", jax.devices()[0].device_kind).strip("-").lower()
    length = f"{max_tokens // 1024}k" if max_tokens else "full"
    return f"smollm2-{length}-{device}"


def summary(probe_dir: Path, eval_dir: Path) -> str:
    """Markdown: the probe's per-layer table and recommendation, then the accuracy table."""
    probe = json.loads((probe_dir / "probe.json").read_text())
    lines = [f"# {probe['model']}: gradient probe and accuracy", "",
             f"Probe: {probe['num_prompts']} prompts ({', '.join(probe['tasks'])}; "
             f"{min(probe['prompt_tokens'])}-{max(probe['prompt_tokens'])} tokens), loss on the {probe['loss']}, "
             f"{probe['seconds']} s. Recommended switch layer **{probe['recommended_switch_layer']}**: "
             f"{probe['rule']} (threshold {probe['threshold']}).", "",
             "| layer | " + " | ".join(SECTIONS) + " | middle / max |", "|---|---|---|---|---|"]
    for layer, norm in enumerate(probe["middle_normalised"]):
        values = " | ".join(f"{probe['sections'][s][layer]:.3e}" for s in SECTIONS)
        lines.append(f"| {layer} | {values} | {norm:.3f} |")
    report = json.loads((eval_dir / "accuracy.json").read_text())
    lines += ["", f"Accuracy: {len(report['samples'])} samples, up to {report['max_tokens']} tokens, "
              f"{report['dtype']}, {report['seconds']} s.", "", (eval_dir / "accuracy.md").read_text().split("\n", 2)[2]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--tag", default=None, help="folder suffix (default: model, length and device)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the model's limit (8192)")
    parser.add_argument("--tasks", default=None, help="comma-separated (default: all)")
    parser.add_argument("--probe-samples", type=int, default=3, help="probe prompts per task")
    parser.add_argument("--eval-samples", type=int, default=8, help="evaluation samples per task")
    parser.add_argument("--switch-layers", default="4,8,12,16,18,20,22,24,26",
                        help="sweep beside the recommended layer")
    parser.add_argument("--threshold", default=None, help="probe rule threshold (default: the probe's)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--implementation", default="xla", help="attention backend for the evaluation")
    parser.add_argument("--reuse-probe", action="store_true",
                        help="keep an existing probe-<tag>/probe.json instead of probing again")
    args = parser.parse_args(argv)

    tag = args.tag or _tag(args.max_tokens)
    probe_dir, eval_dir = Path(args.out) / f"probe-{tag}", Path(args.out) / f"accuracy-{tag}"
    common = [*(["--checkpoint", args.checkpoint] if args.checkpoint else []),
              *(["--max-tokens", str(args.max_tokens)] if args.max_tokens else []),
              *(["--tasks", args.tasks] if args.tasks else [])]
    if not (args.reuse_probe and (probe_dir / "probe.json").is_file()):
        code = probe_main([*common, "--samples-per-task", str(args.probe_samples), "--seed", str(PROBE_SEED),
                           *(["--threshold", args.threshold] if args.threshold else []), "--out", str(probe_dir)])
        if code:
            return code
    code = eval_main([*common, "--samples-per-task", str(args.eval_samples), "--seed", "0",
                      "--switch-layers", args.switch_layers, "--probe", str(probe_dir / "probe.json"),
                      "--dtype", args.dtype, "--implementation", args.implementation, "--out", str(eval_dir)])
    if code:
        return code
    (eval_dir / "summary.md").write_text(summary(probe_dir, eval_dir))
    print(f"wrote {probe_dir} and {eval_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
