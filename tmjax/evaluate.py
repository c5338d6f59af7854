"""The accuracy harness: long-context tasks under dense attention and other layouts side by side.

Every sample (``tmjax.tasks``) is prefilled once per configuration (a layout: ``TriangleMix`` at a
switch layer, with or without ``shallow=VerticalSlash`` or ``FlexPrefill``, or one of those alone) and answered
greedily. Reported per configuration: per-task accuracy (mean ``tasks.score`` x 100), the fraction of
greedy answers whose tokens are identical to the dense answer's with its Wilson 95% interval, and the
KL divergence ``KL(p_dense || p_config)`` of the first generated token's distribution (nats), which
sees changes too small to flip a greedy token.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np

from tmjax import api, interrupts, tasks
from tmjax.attention import IMPLEMENTATIONS
from tmjax.layout import SELECTIONS, FlexPrefill, Layout, TriangleMix, VerticalSlash, check_layout
from tmjax.models.kv_quant import KV_DTYPES
from tmjax.models.params import Params

DENSE = "dense"
CONFIDENCE = 0.95
Z_SCORE = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.95996...
# What the accuracy report checks at a marked configuration (issue 13's targets).
TARGETS = {"accuracy_gap": 1.0, "identical": 0.95, "identical_lower": 0.90, "first_token_kl": 1e-3}


METHODS = {VerticalSlash: "vertical-slash", FlexPrefill: "flexprefill"}  # report names of the shallow methods


def config_name(layout: Layout | None) -> str:
    """The key of a configuration in reports: ``dense``, ``switch=<s>``, ``vertical-slash``,
    ``flexprefill``, ``switch=<s>+vertical-slash`` or ``switch=<s>+flexprefill`` (the budgets are in
    the report's ``configs``)."""
    if layout is None:
        return DENSE
    if not isinstance(layout, TriangleMix):
        return METHODS[type(layout)]
    return f"switch={layout.switch_layer}" + ("" if layout.shallow is None else f"+{METHODS[type(layout.shallow)]}")


def shallow_label(pattern: VerticalSlash | FlexPrefill) -> str:
    """A shallow method's budget in a line: ``200:800``, ``1000:6096 mass=0.9`` or ``gamma=0.9``."""
    if isinstance(pattern, FlexPrefill):
        return f"gamma={pattern.gamma:g}"
    return f"{pattern.vertical}:{pattern.slash}" + ("" if pattern.mass is None else f" mass={pattern.mass:g}")


def detailed_name(layout: Layout | None) -> str:
    """``config_name`` with the shallow method's budget, e.g. ``switch=22+flexprefill gamma=0.95``:
    the names of a run that compares several budgets of one method."""
    pattern = layout.shallow if isinstance(layout, TriangleMix) else layout
    return config_name(layout) + ("" if pattern is None else f" {shallow_label(pattern)}")


def _shallow_from_json(data: dict) -> VerticalSlash | FlexPrefill:
    return FlexPrefill(**data) if "gamma" in data else VerticalSlash(**data)


def layout_from_json(data: dict | None) -> Layout | None:
    """The layout of a report's ``configs`` entry (``dataclasses.asdict`` of it), or None for dense."""
    if data is None:
        return None
    if "switch_layer" in data:
        shallow = data.get("shallow")
        return TriangleMix(**{**data, "shallow": None if shallow is None else _shallow_from_json(shallow)})
    return _shallow_from_json(data)


def wilson_interval(successes: int, n: int, z: float = Z_SCORE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (95% for the default ``z``).

    The bounds are the two roots ``p`` of ``(successes/n - p)**2 = z**2 p (1 - p) / n``; unlike the
    normal approximation they stay in [0, 1] and do not collapse to a point at 0 or n successes.
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """``KL(softmax(p) || softmax(q))`` in nats, computed in float64."""
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"logits must be two vectors of one shape, got {p.shape} and {q.shape}")
    log_p = p - p.max() - np.log(np.sum(np.exp(p - p.max())))
    log_q = q - q.max() - np.log(np.sum(np.exp(q - q.max())))
    return float(max(np.sum(np.exp(log_p) * (log_p - log_q)), 0.0))


def greedy(params: Params, prompt_ids: Sequence[int], layout: Layout | None, *, max_new_tokens: int,
           stop_ids: Sequence[int], cache_room: int, implementation: str | None = None,
           follow: Sequence[int] | None = None, kv_dtype: str | None = None,
           chunk: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Prefill with ``layout`` then greedy decoding (dense attention over the cache) until a stop
    token or ``max_new_tokens``. Returns the first token's float32 logits ``[V]`` and the new tokens
    (the stop token excluded). ``cache_room`` >= ``max_new_tokens`` fixes the cache size, so that one
    compiled prefill serves samples with different answer budgets. With ``follow`` (a reference
    answer) decoding also stops at the first token that departs from it: the answer can no longer
    be identical, and the rest would only cost time. ``kv_dtype`` and ``chunk`` as in ``tmjax.prefill``."""
    logits, cache = api.prefill(params, np.asarray(prompt_ids, np.int32), layout, implementation=implementation,
                                max_new_tokens=cache_room, kv_dtype=kv_dtype, chunk=chunk)
    first = np.asarray(logits, np.float32)
    out: list[int] = []
    token = int(np.argmax(first))
    while token not in stop_ids:
        out.append(token)
        if len(out) == max_new_tokens:
            break
        if follow is not None and (len(out) > len(follow) or token != follow[len(out) - 1]):
            break
        logits, cache = api.decode_step(params, np.int32(token), cache)
        token = int(np.argmax(np.asarray(logits)))
    return first, out


def evaluate(params: Params, tokenizer: object, samples: Sequence[tasks.Sample], configs: Sequence[int | Layout | None],
             *, n_init: int = 8, n_local: int = 512, n_last: int = 128, implementation: str | None = None,
             kv_dtype: str | None = None, chunk: int | None = None) -> dict:
    """Run ``samples`` dense and with each of ``configs``: layouts, or switch layers ``s`` standing for
    ``TriangleMix(s, n_init, n_local, n_last)``. Returns the report dict (``results`` per
    configuration, ``samples`` with every answer). With ``kv_dtype`` (e.g. ``"float8_e4m3fn"``) every
    configuration, dense included, runs with that cache as ``<name> kv=<kv_dtype>`` while the
    reference ``dense`` keeps the weights' dtype, so ``identical_to_dense`` measures the cache's cost."""
    if not samples:
        raise ValueError("evaluate needs at least one sample, got none")
    runs = plan_runs(params, configs, n_init=n_init, n_local=n_local, n_last=n_last, kv_dtype=kv_dtype)
    rows = list(answer_rows(params, tokenizer, samples, runs, implementation=implementation, chunk=chunk))
    return assemble(runs, kv_dtype, rows)


Runs = dict[str, tuple[Layout | None, str | None]]  # report name -> (layout, KV cache dtype or None)


def plan_runs(params: Params, configs: Sequence[int | Layout | None], *, n_init: int = 8, n_local: int = 512,
              n_last: int = 128, kv_dtype: str | None = None) -> Runs:
    """The configurations ``evaluate`` runs, checked against the model, by report name (dense first)."""
    chosen: list[Layout] = []
    for config in configs:
        layout = TriangleMix(switch_layer=config, n_init=n_init, n_local=n_local, n_last=n_last) \
            if isinstance(config, int) and not isinstance(config, bool) else config
        check_layout(layout)
        if layout is not None:
            layout.check_layers(params.config.num_layers)
            chosen.append(layout)
    chosen = list(dict.fromkeys(chosen))
    # several budgets of one method in a run: each is named with its budget
    plain = collections.Counter(config_name(layout) for layout in chosen)
    layouts: dict[str, Layout | None] = {DENSE: None}
    layouts.update({config_name(x) if plain[config_name(x)] == 1 else detailed_name(x): x for x in chosen})
    runs = {name: (layout, None) for name, layout in layouts.items() if kv_dtype is None or layout is None}
    if kv_dtype is not None:
        runs.update({f"{name} kv={kv_dtype}": (layout, kv_dtype) for name, layout in layouts.items()})
    return runs


def answer_rows(params: Params, tokenizer: object, samples: Sequence[tasks.Sample], runs: Runs, *,
                implementation: str | None = None, chunk: int | None = None) -> Iterator[dict]:
    """One finished row per sample, as each completes (every configuration's answer and its comparisons),
    so that a stopped run still has whole rows to report."""
    bases = _triangle_bases(runs)
    stop_ids = [i for i in (tokenizer.eos_token_id,) if i is not None]
    cache_room = max(s.max_new_tokens for s in samples)
    for sample in samples:
        encoded = tasks.encode(tokenizer, sample)
        row = {"task": sample.task, "seed": sample.seed, "prompt_tokens": len(encoded.prompt_ids),
               "max_new_tokens": sample.max_new_tokens, "answers": list(sample.answers), "configs": {}}
        dense_first = dense_tokens = None
        tokens: dict[str, list[int]] = {}
        for name, (layout, kv) in runs.items():
            first, new = greedy(params, encoded.prompt_ids, layout, max_new_tokens=sample.max_new_tokens,
                                stop_ids=stop_ids, cache_room=cache_room, implementation=implementation,
                                kv_dtype=kv, chunk=chunk)
            if name == DENSE:
                dense_first, dense_tokens = first, new
            text = tokenizer.decode(new, skip_special_tokens=True)
            tokens[name] = new
            row["configs"][name] = {"output": text, "score": tasks.score(text, sample.answers),
                                    "identical_to_dense": new == dense_tokens,
                                    "first_token_kl": kl_divergence(dense_first, first)}
        for name, base in bases.items():
            row["configs"][name]["identical_to_triangle"] = tokens[name] == tokens[base]
        yield row


def assemble(runs: Runs, kv_dtype: str | None, rows: Sequence[dict]) -> dict:
    """The report dict of finished ``rows`` (``evaluate``'s return value)."""
    return {"configs": {name: None if layout is None else dataclasses.asdict(layout)
                        for name, (layout, _) in runs.items()},
            "kv_dtype": kv_dtype, "triangle_bases": _triangle_bases(runs), "results": summarise(rows, list(runs)),
            "samples": list(rows)}


def _triangle_bases(runs: dict[str, tuple[Layout | None, str | None]]) -> dict[str, str]:
    """Each TriangleMix + shallow-method run's partner: the run of that TriangleMix alone with the same
    cache dtype, where there is one. Comparing the two shows what the shallow method itself changes,
    apart from the run-to-run noise of the dense reference."""
    by_layout = {(layout, kv): name for name, (layout, kv) in runs.items()}
    return {name: by_layout[base] for name, (layout, kv) in runs.items()
            if isinstance(layout, TriangleMix) and layout.shallow is not None
            and (base := (dataclasses.replace(layout, shallow=None), kv)) in by_layout}


def summarise(rows: Sequence[dict], names: Sequence[str]) -> dict:
    """Per configuration: accuracy per task and averaged over tasks (percent), fraction of answers
    identical to dense (and the count, the number of samples and its Wilson 95% interval), and the
    mean and max first-token KL over samples; for a combined configuration whose rows carry
    ``identical_to_triangle``, the same count and interval against its TriangleMix alone."""
    task_names = list(dict.fromkeys(row["task"] for row in rows))
    results = {}
    for name in names:
        accuracy = {t: 100.0 * float(np.mean([r["configs"][name]["score"] for r in rows if r["task"] == t]))
                    for t in task_names}
        kls = [r["configs"][name]["first_token_kl"] for r in rows]
        identical = sum(bool(r["configs"][name]["identical_to_dense"]) for r in rows)
        results[name] = {
            "accuracy": accuracy,
            "average": float(np.mean(list(accuracy.values()))),
            "identical_to_dense": identical / len(rows),
            "identical_count": identical,
            "samples": len(rows),
            "identical_to_dense_interval": list(wilson_interval(identical, len(rows))),
            "first_token_kl_mean": float(np.mean(kls)),
            "first_token_kl_max": float(np.max(kls)),
        }
        if all("identical_to_triangle" in r["configs"][name] for r in rows):
            same = sum(bool(r["configs"][name]["identical_to_triangle"]) for r in rows)
            results[name].update(identical_to_triangle=same / len(rows), identical_to_triangle_count=same,
                                 identical_to_triangle_interval=list(wilson_interval(same, len(rows))))
    return results


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets_line(name: str, label: str, results: dict) -> str:
    """One sentence checking ``TARGETS`` at configuration ``name`` against dense."""
    r, dense = results[name], results[DENSE]
    gap = dense["average"] - r["average"]
    low, high = r["identical_to_dense_interval"]
    return (f"At {name} ({label}): average accuracy {r['average']:.1f} vs dense {dense['average']:.1f} "
            f"(gap {gap:+.1f} points; target <= {TARGETS['accuracy_gap']:g}: {_met(gap <= TARGETS['accuracy_gap'])}); "
            f"{r['identical_count']}/{r['samples']} = {_percent(r['identical_to_dense'])} of greedy answers identical "
            f"to dense, Wilson 95% interval {_percent(low)}-{_percent(high)} (targets: point >= "
            f"{_percent(TARGETS['identical'])}: {_met(r['identical_to_dense'] >= TARGETS['identical'])}, lower bound >= "
            f"{_percent(TARGETS['identical_lower'])}: {_met(low >= TARGETS['identical_lower'])}); mean first-token KL "
            f"{r['first_token_kl_mean']:.1e} (target <= {TARGETS['first_token_kl']:g}: "
            f"{_met(r['first_token_kl_mean'] <= TARGETS['first_token_kl'])}).")


def markdown(report: dict, recommended: int | None = None) -> str:
    """The results table (one row per configuration), each configuration labelled by ``report["marks"]``
    (name -> label, e.g. ``calibrated``) and ``recommended`` (a switch layer, labelled ``recommended``);
    the targets are checked at each ``calibrated`` configuration, else at the ``recommended`` one."""
    results = report["results"]
    marks = dict(report.get("marks", {}))
    if recommended is not None:
        marks.setdefault(config_name(TriangleMix(recommended)), "recommended")
    task_names = list(results[DENSE]["accuracy"])
    head = ["config", *task_names, "average", "identical to dense", "95% interval", "KL mean", "KL max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        mark = f" ({marks[name]})" if name in marks else ""
        low, high = r["identical_to_dense_interval"]
        cells = [name + mark, *(f"{r['accuracy'][t]:.1f}" for t in task_names), f"{r['average']:.1f}",
                 _percent(r["identical_to_dense"]), f"{_percent(low)}-{_percent(high)}",
                 f"{r['first_token_kl_mean']:.2e}", f"{r['first_token_kl_max']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    paired = [(name, r) for name, r in results.items() if "identical_to_triangle" in r]
    if paired:
        lines += ["", "Against TriangleMix alone in the same run (what the shallow method changes): " + "; ".join(
            f"{name} {r['identical_to_triangle_count']}/{r['samples']} = {_percent(r['identical_to_triangle'])} "
            f"identical (Wilson 95% {_percent(r['identical_to_triangle_interval'][0])}-"
            f"{_percent(r['identical_to_triangle_interval'][1])})" for name, r in paired) + "."]
    for label in ("calibrated", "recommended"):
        checked = [name for name, mark in marks.items() if mark == label and name in results]
        lines += [line for name in checked for line in ("", targets_line(name, label, results))]
        if checked:
            break
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, title: str) -> None:
    """Per configuration: the identical-answer rate with its Wilson 95% interval and the average
    accuracy, dense's accuracy as a line; configurations in report order, labelled with their marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, marks = report["results"], report.get("marks", {})
    names = list(results)
    x = np.arange(len(names))
    rate = np.array([100 * results[n]["identical_to_dense"] for n in names])
    low, high = (np.array([100 * results[n]["identical_to_dense_interval"][i] for n in names]) for i in (0, 1))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4.5))
    ax.errorbar(x, rate, yerr=[rate - low, high - rate], fmt="s", capsize=4,
                label="% greedy answers identical to dense (Wilson 95%)")
    ax.plot(x, [results[n]["average"] for n in names], "o", label="average task accuracy")
    ax.axhline(results[DENSE]["average"], color="black", linestyle=":", label="dense average accuracy")
    ax.set_xticks(x, [n + (f"\n({marks[n]})" if n in marks else "") for n in names], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _layers(spec: str) -> list[int]:
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--switch-layers must be comma-separated integers, got {spec!r}") from None
    return sorted(set(layers))


def _order(layout: Layout | None) -> tuple[int, int]:
    """Report order: dense, TriangleMix by switch layer, vertical-slash, FlexPrefill, TriangleMix +
    vertical-slash, TriangleMix + FlexPrefill."""
    if layout is None:
        return -1, 0
    methods = list(METHODS)
    if not isinstance(layout, TriangleMix):
        return 1 + methods.index(type(layout)), 0
    return (0 if layout.shallow is None else 1 + len(methods) + methods.index(type(layout.shallow))), layout.switch_layer


def parse_configs(spec: str, *, triangle: dict, pattern: VerticalSlash, flex: FlexPrefill = FlexPrefill()
                  ) -> list[Layout | None]:
    """``--configs``: comma-separated ``dense``, ``tm:<layer>`` (TriangleMix with the ``triangle`` sizes),
    ``vs`` / ``fp`` (``pattern`` / ``flex`` in every layer) and ``tm:<layer>+vs`` / ``tm:<layer>+fp``
    (TriangleMix, that method below it). ``fp@<gamma>`` and ``vs@<mass>`` set that method's mass for
    one configuration, so that one run (one dense reference) compares several."""
    layouts: list[Layout | None] = []
    for item in (part.strip() for part in spec.split(",")):
        head, plus, tail = item.partition("+")
        kind, colon, layer = head.partition(":")
        below = _shallow(tail, pattern, flex) if plus else None
        if item == DENSE:
            layouts.append(None)
        elif not plus and (method := _shallow(item, pattern, flex)) is not None:
            layouts.append(method)
        elif kind == "tm" and colon and layer.isdigit() and (not plus or below is not None):
            layouts.append(TriangleMix(int(layer), **triangle, shallow=below))
        else:
            raise ValueError(f"--configs: cannot read {item!r}; use dense, tm:<layer>, vs, fp, tm:<layer>+vs or "
                             "tm:<layer>+fp, with fp@<gamma> / vs@<mass> for one configuration's mass "
                             "(e.g. --configs dense,tm:22,tm:22+vs,tm:22+fp@0.9,tm:22+fp@0.95)")
    return layouts


def _shallow(text: str, pattern: VerticalSlash, flex: FlexPrefill) -> VerticalSlash | FlexPrefill | None:
    """``vs``, ``fp``, ``vs@<mass>`` or ``fp@<gamma>`` (a mass in (0, 1]); None for anything else."""
    name, at, value = text.partition("@")
    method = {"vs": pattern, "fp": flex}.get(name)
    if method is None or not at:
        return method
    try:
        mass = float(value)
    except ValueError:
        return None
    if not 0.0 < mass <= 1.0:
        return None
    return dataclasses.replace(method, gamma=mass) if isinstance(method, FlexPrefill) \
        else dataclasses.replace(method, mass=mass)


def add_vertical_slash_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``VerticalSlash`` options other than its budgets (``tmjax eval`` and ``tmjax calibrate``)."""
    default = VerticalSlash()
    parser.add_argument("--last-q", type=int, default=default.last_q,
                        help=f"vertical-slash: queries that estimate the pattern (default {default.last_q})")
    parser.add_argument("--force-vertical", type=int, default=default.force_vertical,
                        help=f"vertical-slash: first columns always kept (default {default.force_vertical})")
    parser.add_argument("--force-slash", type=int, default=default.force_slash,
                        help=f"vertical-slash: first diagonals always kept (default {default.force_slash})")
    parser.add_argument("--selection", choices=SELECTIONS, default=default.selection,
                        help=f"vertical-slash: one selection per KV group or per head (default {default.selection})")
    parser.add_argument("--no-guard", dest="guard", action="store_false",
                        help="vertical-slash and flexprefill: no density guard (a head keeping most of its causal "
                             "blocks stays sparse instead of running dense)")


def vertical_slash(args: argparse.Namespace, vertical: int, slash: int, mass: float | None = None) -> VerticalSlash:
    """A ``VerticalSlash`` with these budgets (caps, with ``mass``) and the options of
    ``add_vertical_slash_arguments``."""
    return VerticalSlash(vertical=vertical, slash=slash, last_q=args.last_q, force_vertical=args.force_vertical,
                         force_slash=args.force_slash, selection=args.selection, mass=mass, guard=args.guard)


def add_flexprefill_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``FlexPrefill`` options other than ``gamma`` and its vertical-slash caps (``tmjax eval`` and
    ``tmjax calibrate``); its forced columns/diagonals and selection are the vertical-slash options'."""
    default = FlexPrefill()
    parser.add_argument("--tau", type=float, default=default.tau,
                        help=f"flexprefill: query-aware below this sqrt-JS distance (default {default.tau})")
    parser.add_argument("--block", type=int, default=default.block,
                        help=f"flexprefill: block size, a multiple of 64 (default {default.block})")
    parser.add_argument("--max-blocks", type=int, default=default.max_blocks,
                        help=f"flexprefill: most key blocks per query block (default {default.max_blocks})")


def flexprefill(args: argparse.Namespace, gamma: float, vertical: int, slash: int) -> FlexPrefill:
    """A ``FlexPrefill`` with this ``gamma`` and caps and the options of ``add_flexprefill_arguments``
    and ``add_vertical_slash_arguments``."""
    return FlexPrefill(gamma=gamma, tau=args.tau, block=args.block, max_blocks=args.max_blocks, vertical=vertical,
                       slash=slash, force_vertical=args.force_vertical, force_slash=args.force_slash,
                       selection=args.selection, guard=args.guard)


def add_task_arguments(parser: argparse.ArgumentParser, *, samples_per_task: int,
                       default_tasks: Sequence[str] = tasks.ALL_TASKS) -> None:
    """Options shared by ``tmjax probe`` and ``tmjax eval``: model, tasks, lengths, triangle sizes."""
    parser.add_argument("--checkpoint", default=None,
                        help="tmjax checkpoint folder (default: SmolLM2-135M-Instruct, converted on first use)")
    parser.add_argument("--tasks", default=",".join(default_tasks),
                        help=f"comma-separated task names, from {','.join(tasks.ALL_TASKS)} "
                             f"(default: {','.join(default_tasks)})")
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
    unknown = [name for name in names if name not in tasks.ALL_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown or missing task names {unknown or spec!r}; choose from {tasks.ALL_TASKS}")
    return names


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def deterministic_gpu(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Ask XLA for run-to-run deterministic GPU ops, unless ``XLA_FLAGS`` already says either way.

    Without it bf16 rounding differs from one process to the next, and that alone changed 8-10% of
    SmolLM2's greedy answers between two dense runs on an H100, more than the differences the
    comparisons measure; with it two runs gave the same 105 answers (``bench/results/noise-floor-H100-20261206``).
    Takes effect only before the process first uses a device, as the CLIs call it."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def run_cli(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and call ``run`` with deterministic GPU ops (``deterministic_gpu``); bad input becomes
    an ``error:`` line and exit code 1, not a traceback."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error, already printed by argparse
        return int(exit_.code or 0)
    deterministic_gpu()
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


def _calibrated_layout(spec: str) -> Layout | None:
    """The ``recommended_layout`` of a calibration.json named by ``--calibration``, checked up front."""
    try:
        data = json.loads(Path(spec).read_text())
        return layout_from_json(data["recommended_layout"])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"--calibration {spec}: not a calibration.json written by `tmjax calibrate` "
                         f"({type(err).__name__}: {err})") from None


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``tmjax eval``: writes ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` to ``--out``."""
    parser = argparse.ArgumentParser(prog="tmjax eval", description=__doc__.splitlines()[0])
    add_task_arguments(parser, samples_per_task=5)
    parser.add_argument("--switch-layers", default=None,
                        help="comma-separated switch layers to compare with dense (default: every 4th layer, "
                             "unless --configs is given)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configurations: dense, tm:<layer> (TriangleMix), vs (vertical-slash "
                             "in every layer), fp (FlexPrefill in every layer), tm:<layer>+vs and tm:<layer>+fp "
                             "(TriangleMix, that method below the switch layer); e.g. dense,tm:22,vs,tm:22+vs,tm:22+fp")
    parser.add_argument("--vertical", type=int, default=VerticalSlash().vertical,
                        help=f"vertical-slash: kept columns (default {VerticalSlash().vertical})")
    parser.add_argument("--slash", type=int, default=VerticalSlash().slash,
                        help=f"vertical-slash: kept diagonals (default {VerticalSlash().slash})")
    parser.add_argument("--mass", type=float, default=None,
                        help="vertical-slash: keep columns/diagonals up to this share of the estimated attention "
                             "mass, --vertical/--slash then being caps (default: fixed budgets)")
    parser.add_argument("--gamma", type=float, default=FlexPrefill().gamma,
                        help=f"flexprefill: share of the estimated attention mass kept (default {FlexPrefill().gamma}); "
                             "--vertical/--slash cap its vertical-slash heads")
    add_vertical_slash_arguments(parser)
    add_flexprefill_arguments(parser)
    parser.add_argument("--probe", default=None,
                        help="a probe.json: its recommended switch layer is added and marked in the report")
    parser.add_argument("--calibration", action="append", default=[],
                        help="a calibration.json (tmjax calibrate): its recommended layout is added, marked "
                             "calibrated, and checked against the targets (repeat for several)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--implementation", default=None, choices=IMPLEMENTATIONS,
                        help="attention backend (default: the platform's)")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                        help="run every configuration (dense too, as '<name> kv=<dtype>') with this KV cache "
                             "against the dense reference in the checkpoint's dtype (e.g. int8, float8_e4m3fn)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="tokens per chunk of prefill's per-token stages (default: the model's, tmjax.memory)")
    return run_cli("tmjax eval", parser, _eval, argv)


def _eval(args: argparse.Namespace) -> int:
    names = task_list(args.tasks)
    out = output_folder(args.out)
    triangle = dict(n_init=args.n_init, n_local=args.n_local, n_last=args.n_last)
    configs: list[int | Layout | None] = []
    if args.configs:
        configs += parse_configs(args.configs, triangle=triangle,
                                 pattern=vertical_slash(args, args.vertical, args.slash, args.mass),
                                 flex=flexprefill(args, args.gamma, args.vertical, args.slash))
    if args.switch_layers:
        configs += _layers(args.switch_layers)
    recommended = _probe_switch_layer(args.probe) if args.probe else None
    calibrated = [_calibrated_layout(path) for path in args.calibration]
    params, tokenizer, name = load_model(args.checkpoint, args.dtype)
    num_layers = params.config.num_layers
    if not args.configs and not args.switch_layers:
        configs = list(range(4, num_layers, 4))
    marked: dict[Layout, str] = {}
    if recommended is not None and recommended < num_layers:
        configs.append(recommended)
        marked[TriangleMix(recommended, **triangle)] = "recommended"
    for layout in calibrated:
        configs.append(layout)
        marked[layout] = "calibrated"
    layouts = [TriangleMix(c, **triangle) if isinstance(c, int) else c for c in configs]
    layouts = sorted(dict.fromkeys(x for x in layouts if x is not None), key=_order)
    max_tokens = args.max_tokens or params.config.max_position_embeddings
    started = time.perf_counter()
    samples = tasks.generate_suite(names, samples_per_task=args.samples_per_task, seed=args.seed,
                                   max_tokens=max_tokens, count=tasks.token_counter(tokenizer))
    runs = plan_runs(params, layouts, **triangle, kv_dtype=args.kv_dtype)
    rows: list[dict] = []
    stopped: KeyboardInterrupt | None = None
    try:  # a stop (SIGINT, SIGTERM: e.g. `timeout`) keeps the finished samples' report
        for row in answer_rows(params, tokenizer, samples, runs, implementation=args.implementation, chunk=args.chunk):
            rows.append(row)
            interrupts.check()  # a signal whose exception jax swallowed (e.g. in a gc callback)
    except KeyboardInterrupt as err:
        if not rows:
            raise
        stopped = err
    report = assemble(runs, args.kv_dtype, rows)
    marks = {name: marked[layout] for name, data in report["configs"].items()
             if (layout := layout_from_json(data)) in marked}
    done = f"{len(rows)} samples" if stopped is None else f"{len(rows)} of {len(samples)} samples, interrupted"
    report = {"model": name, "dtype": str(params.weights["norm"]["scale"].dtype), "max_tokens": max_tokens,
              "samples_per_task": args.samples_per_task, "seed": args.seed, "recommended_switch_layer": recommended,
              "marks": marks, "seconds": round(time.perf_counter() - started, 1),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "interrupted": None if stopped is None else f"{stopped} after {len(rows)} of {len(samples)} samples",
              **report}
    table = markdown(report)
    with interrupts.deferred(raise_at_end=stopped is None):  # whole files, even if a signal comes now
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "accuracy.json", json.dumps(report, indent=2))
        write_atomically(out / "accuracy.md", f"# {name}: accuracy, dense vs sparse layouts ({max_tokens} tokens, {done})\n\n{table}")
        plot(report, out / "accuracy.png", f"{name}, {max_tokens} tokens")
    print(table)
    if stopped is not None:
        print(f"tmjax eval: interrupted ({stopped}): the report in {out} holds the {len(rows)} finished of "
              f"{len(samples)} samples", file=sys.stderr)
        raise stopped
    return 0


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary name in the same folder, so a reader never sees half a file."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    os.replace(part, path)


def save_figure(fig: object, path: Path) -> None:
    """A matplotlib figure into ``path`` as ``write_atomically`` writes text (the format from the
    suffix), then closed."""
    import matplotlib.pyplot as plt

    part = path.with_name(f".{path.name}.part")
    fig.savefig(part, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(part, path)
