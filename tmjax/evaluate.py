"""The accuracy harness: long-context tasks under dense attention and TriangleMix at several switch layers.

Every sample (``tmjax.tasks``) is prefilled once per configuration and answered greedily. Reported per
configuration: per-task accuracy (mean ``tasks.score`` x 100), the fraction of greedy answers whose
tokens are identical to the dense answer's, and the KL divergence ``KL(p_dense || p_config)`` of the
first generated token's distribution (nats), which sees changes too small to flip a greedy token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tmjax import api, tasks
from tmjax.layout import TriangleMix
from tmjax.models.params import Params

DENSE = "dense"


def config_name(switch_layer: int | None) -> str:
    """``"dense"`` or ``"switch=<layer>"``: the key of a configuration in the report."""
    return DENSE if switch_layer is None else f"switch={switch_layer}"


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """``KL(softmax(p) || softmax(q))`` in nats, computed in float64."""
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"logits must be two vectors of one shape, got {p.shape} and {q.shape}")
    log_p = p - p.max() - np.log(np.sum(np.exp(p - p.max())))
    log_q = q - q.max() - np.log(np.sum(np.exp(q - q.max())))
    return float(max(np.sum(np.exp(log_p) * (log_p - log_q)), 0.0))


def greedy(params: Params, prompt_ids: Sequence[int], layout: TriangleMix | None, *, max_new_tokens: int,
           stop_ids: Sequence[int], cache_room: int, implementation: str | None = None
           ) -> tuple[np.ndarray, list[int]]:
    """Prefill with ``layout`` then greedy decoding (dense attention over the cache) until a stop
    token or ``max_new_tokens``. Returns the first token's float32 logits ``[V]`` and the new tokens
    (the stop token excluded). ``cache_room`` >= ``max_new_tokens`` fixes the cache size, so that one
    compiled prefill serves samples with different answer budgets."""
    logits, cache = api.prefill(params, np.asarray(prompt_ids, np.int32), layout, implementation=implementation,
                                max_new_tokens=cache_room)
    first = np.asarray(logits, np.float32)
    out: list[int] = []
    token = int(np.argmax(first))
    while token not in stop_ids:
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits, cache = api.decode_step(params, np.int32(token), cache)
        token = int(np.argmax(np.asarray(logits)))
    return first, out


def evaluate(params: Params, tokenizer: object, samples: Sequence[tasks.Sample], switch_layers: Sequence[int], *,
             n_init: int = 8, n_local: int = 512, n_last: int = 128, implementation: str | None = None) -> dict:
    """Run ``samples`` dense and with TriangleMix at each of ``switch_layers``; returns the report dict
    (``results`` per configuration, ``samples`` with every answer)."""
    if not samples:
        raise ValueError("evaluate needs at least one sample, got none")
    layouts: dict[str, TriangleMix | None] = {DENSE: None}
    for layer in switch_layers:
        layout = TriangleMix(switch_layer=layer, n_init=n_init, n_local=n_local, n_last=n_last)
        layout.check_layers(params.config.num_layers)
        layouts[config_name(layer)] = layout
    stop_ids = [i for i in (tokenizer.eos_token_id,) if i is not None]
    cache_room = max(s.max_new_tokens for s in samples)
    rows = []
    for sample in samples:
        encoded = tasks.encode(tokenizer, sample)
        row = {"task": sample.task, "seed": sample.seed, "prompt_tokens": len(encoded.prompt_ids),
               "max_new_tokens": sample.max_new_tokens, "answers": list(sample.answers), "configs": {}}
        dense_first = dense_tokens = None
        for name, layout in layouts.items():
            first, new = greedy(params, encoded.prompt_ids, layout, max_new_tokens=sample.max_new_tokens,
                                stop_ids=stop_ids, cache_room=cache_room, implementation=implementation)
            if layout is None:
                dense_first, dense_tokens = first, new
            text = tokenizer.decode(new, skip_special_tokens=True)
            row["configs"][name] = {"output": text, "score": tasks.score(text, sample.answers),
                                    "identical_to_dense": new == dense_tokens,
                                    "first_token_kl": kl_divergence(dense_first, first)}
        rows.append(row)
    return {"configs": {name: None if layout is None else dataclasses.asdict(layout)
                        for name, layout in layouts.items()},
            "results": summarise(rows, list(layouts)), "samples": rows}


def summarise(rows: Sequence[dict], names: Sequence[str]) -> dict:
    """Per configuration: accuracy per task and averaged over tasks (percent), fraction of answers
    identical to dense, and the mean and max first-token KL over samples."""
    task_names = list(dict.fromkeys(row["task"] for row in rows))
    results = {}
    for name in names:
        accuracy = {t: 100.0 * float(np.mean([r["configs"][name]["score"] for r in rows if r["task"] == t]))
                    for t in task_names}
        kls = [r["configs"][name]["first_token_kl"] for r in rows]
        results[name] = {
            "accuracy": accuracy,
            "average": float(np.mean(list(accuracy.values()))),
            "identical_to_dense": float(np.mean([r["configs"][name]["identical_to_dense"] for r in rows])),
            "first_token_kl_mean": float(np.mean(kls)),
            "first_token_kl_max": float(np.max(kls)),
        }
    return results


def markdown(report: dict, recommended: int | None = None) -> str:
    """The results table (one row per configuration), with the targets checked at ``recommended``."""
    results = report["results"]
    task_names = list(results[DENSE]["accuracy"])
    head = ["config", *task_names, "average", "identical to dense", "KL mean", "KL max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        mark = " (recommended)" if recommended is not None and name == config_name(recommended) else ""
        cells = [name + mark, *(f"{r['accuracy'][t]:.1f}" for t in task_names), f"{r['average']:.1f}",
                 f"{100 * r['identical_to_dense']:.0f}%", f"{r['first_token_kl_mean']:.2e}",
                 f"{r['first_token_kl_max']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    if recommended is not None and config_name(recommended) in results:
        r, dense = results[config_name(recommended)], results[DENSE]
        gap = dense["average"] - r["average"]
        lines += ["", f"At the recommended switch layer {recommended}: average accuracy {r['average']:.1f} vs dense "
                  f"{dense['average']:.1f} (gap {gap:+.1f} points; target <= 1: {'met' if gap <= 1 else 'NOT met'}); "
                  f"{100 * r['identical_to_dense']:.0f}% of greedy answers identical to dense "
                  f"(target >= 95%: {'met' if r['identical_to_dense'] >= 0.95 else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, title: str, recommended: int | None = None) -> None:
    """Average accuracy and identical-answer fraction against the switch layer, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(c["switch_layer"] for c in report["configs"].values() if c is not None)
    results = report["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, [results[config_name(s)]["average"] for s in layers], "-o", label="TriangleMix average accuracy")
    ax.plot(layers, [100 * results[config_name(s)]["identical_to_dense"] for s in layers], "-s",
            label="% answers identical to dense")
    ax.axhline(results[DENSE]["average"], color="black", linestyle=":", label="dense average accuracy")
    if recommended is not None:
        ax.axvline(recommended, color="grey", linestyle="--", label=f"recommended switch layer {recommended}")
    ax.set_xlabel("switch layer (first Triangle layer)")
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layers(spec: str) -> list[int]:
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--switch-layers must be comma-separated integers, got {spec!r}") from None
    return sorted(set(layers))


def add_task_arguments(parser: argparse.ArgumentParser, *, samples_per_task: int) -> None:
    """Options shared by ``tmjax probe`` and ``tmjax eval``: model, tasks, lengths, triangle sizes."""
    parser.add_argument("--checkpoint", default=None,
                        help="tmjax checkpoint folder (default: SmolLM2-135M-Instruct, converted on first use)")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS),
                        help=f"comma-separated task names (default: all of {','.join(tasks.TASKS)})")
    parser.add_argument("--samples-per-task", type=int, default=samples_per_task)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="prompt + answer budget in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-init", type=int, default=8)
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--n-last", type=int, default=128)
    parser.add_argument("--out", default=".", help="output folder (created if missing; default: current folder)")


def load_model(checkpoint: str | None, dtype: str | None = None) -> tuple[Params, object, str]:
    """Params, tokenizer and a display name for ``--checkpoint`` (default: SmolLM2-135M-Instruct)."""
    from tmjax import checkpoint as ckpt
    from tmjax.default_model import smollm2_checkpoint

    folder = Path(checkpoint) if checkpoint else smollm2_checkpoint()
    return ckpt.load(folder, dtype=dtype), ckpt.tokenizer(folder), folder.name


def task_list(spec: str) -> list[str]:
    """``--tasks`` parsed and checked."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in tasks.TASKS]
    if unknown or not names:
        raise ValueError(f"unknown or missing task names {unknown or spec!r}; choose from {tasks.TASKS}")
    return names


def run_cli(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and call ``run``; bad input becomes an ``error:`` line and exit code 1, not a traceback."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error, already printed by argparse
        return int(exit_.code or 0)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1


def output_folder(spec: str) -> Path:
    """``--out`` checked before any model work: refused if it, or a folder above it, is a file."""
    out = Path(spec)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"--out {spec}: {path} is a file, not a folder; choose another --out")
            break
    return out


def _probe_switch_layer(spec: str) -> int:
    """The ``recommended_switch_layer`` of a probe.json named by ``--probe``, checked up front."""
    try:
        data = json.loads(Path(spec).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--probe {spec}: cannot read it as JSON ({err})") from None
    layer = data.get("recommended_switch_layer") if isinstance(data, dict) else None
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"--probe {spec} has no 'recommended_switch_layer' (a layer number): pass a probe.json "
                         "written by `tmjax probe`")
    return layer


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``tmjax eval``: writes ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` to ``--out``."""
    parser = argparse.ArgumentParser(prog="tmjax eval", description=__doc__.splitlines()[0])
    add_task_arguments(parser, samples_per_task=5)
    parser.add_argument("--switch-layers", default=None,
                        help="comma-separated switch layers to compare with dense (default: every 4th layer)")
    parser.add_argument("--probe", default=None,
                        help="a probe.json: its recommended switch layer is added and marked in the report")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--implementation", default=None, help="attention backend (default: the platform's)")
    return run_cli("tmjax eval", parser, _eval, argv)


def _eval(args: argparse.Namespace) -> int:
    requested, names = _layers(args.switch_layers) if args.switch_layers else None, task_list(args.tasks)
    out = output_folder(args.out)
    recommended = _probe_switch_layer(args.probe) if args.probe else None
    params, tokenizer, name = load_model(args.checkpoint, args.dtype)
    num_layers = params.config.num_layers
    layers = requested if requested is not None else list(range(4, num_layers, 4))
    if recommended is not None and recommended < num_layers:
        layers = sorted({*layers, recommended})
    max_tokens = args.max_tokens or params.config.max_position_embeddings
    started = time.perf_counter()
    samples = tasks.generate_suite(names, samples_per_task=args.samples_per_task, seed=args.seed,
                                   max_tokens=max_tokens, count=tasks.token_counter(tokenizer))
    report = evaluate(params, tokenizer, samples, layers, n_init=args.n_init, n_local=args.n_local,
                      n_last=args.n_last, implementation=args.implementation)
    report = {"model": name, "dtype": str(params.weights["norm"]["scale"].dtype), "max_tokens": max_tokens,
              "samples_per_task": args.samples_per_task, "seed": args.seed, "recommended_switch_layer": recommended,
              "seconds": round(time.perf_counter() - started, 1), **report}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    table = markdown(report, recommended)
    (out / "accuracy.md").write_text(f"# {name}: accuracy, dense vs TriangleMix ({max_tokens} tokens, "
                                     f"{len(samples)} samples)\n\n{table}")
    plot(report, out / "accuracy.png", f"{name}, {max_tokens} tokens", recommended)
    print(table)
    return 0
