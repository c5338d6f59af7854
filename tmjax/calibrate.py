"""Calibration: the earliest switch layer, and the smallest shallow vertical-slash budget, whose measured
divergence from dense meets a stated guarantee.

Divergence is measured on held-out prompts (``tasks.generate_mixed`` from seed ``CALIBRATION_SEED``,
apart from the probe's and the evaluation's seeds): whether the greedy answer is token-for-token the
dense answer, and the first-token ``KL(p_dense || p_config)``. A configuration *passes* when, over
all ``samples`` prompts, the Wilson 95% lower bound of its identical-answer rate is at least
``identical`` and its mean KL is at most ``max_kl``.

Search. ``TriangleMix(s)`` makes layers ``s..L-1`` Triangle layers, so switching at ``s`` sparsifies
every layer that switching at ``s + 1`` does, and one more. Each layer's error reaches the output
through all the layers after it, so divergence accumulates over the Triangle layers and is expected
to grow as ``s`` falls: "passes" is a threshold predicate, false below some ``s*`` and true from it
on (``s = L``, all dense, passes by definition). ``search`` keeps a bracket: the highest layer measured
to fail and the lowest measured to pass. It starts at the probe's layer (or ``--start-layer``, e.g. where
an earlier run's verdicts bracket the answer), gallops away from it by
doubling steps until the bracket closes around a failure/pass pair, then bisects. Under the threshold
assumption that is the earliest passing layer, after ``O(log |s* - s_probe|)`` measurements. When the
assumption fails (interactions, noise) the answer is still a layer measured to pass, with the layer
below it measured to fail: the guarantee stated for the recommended layer never rests on the
assumption; only "earliest" does.

Vertical-slash budgets for the layers below the switch layer (``TriangleMix(s, shallow=VerticalSlash)``)
are searched the same way at the calibrated switch layer, over a ladder of budgets whose columns and
diagonals both grow (``parse_budgets`` checks it): vertical-slash keeps the top-scoring columns and
diagonals of one estimate, so a larger budget keeps a superset and divergence falls along the ladder.
The ladder's fallback is the calibrated layout with dense shallow layers, which already passed.
``--masses`` makes the ladder one of growing attention masses instead (``VerticalSlash(mass=gamma)``
or ``FlexPrefill(gamma=gamma)``, capped by the last ``--budgets`` pair): the mass rule keeps a prefix
of one ranking, and FlexPrefill's head classes do not depend on ``gamma``, so a larger mass keeps a
superset there too (``parse_masses`` checks that they grow).

Stopping rule (``Criterion.verdict``). A configuration is measured one prompt at a time and stops as
soon as its verdict is certain: fail once even identical answers on every remaining prompt could not
lift the Wilson lower bound to ``identical``, or once the KL already summed exceeds
``max_kl * samples`` (KL >= 0). That is the verdict all ``samples`` prompts would give; a pass always
measures them all. The search stops when its bracket closes.

Resuming (``Journal``, ``--resume``). Each configuration's record is appended to
``calibration.journal.jsonl`` in ``--out`` as soon as its verdict is reached; a run stopped before the
end (a time limit, a signal) and started again with ``--resume`` and the same settings takes those
verdicts instead of measuring them again (the same prompts give the same answers), and the dense
answers recorded beside it (``calibration.journal.jsonl.dense/``), so a search longer than one sitting
finishes in several. Both are removed once ``calibration.json`` is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tmjax import checkpoint, tasks
from tmjax import probe as probe_
from tmjax.evaluate import (
    CONFIDENCE, Z_SCORE, add_flexprefill_arguments, add_vertical_slash_arguments, config_name, detailed_name,
    flexprefill, greedy, kl_divergence, layout_from_json, load_model, output_folder, run_cli, save_figure, shallow_label,
    task_list, vertical_slash, wilson_interval, write_atomically,
)
from tmjax.attention import IMPLEMENTATIONS
from tmjax.layout import FlexPrefill, Layout, TriangleMix, VerticalSlash
from tmjax.models.params import Params

PROBE_SEED = 1000  # seeds of the probe's prompts (bench/accuracy.py, and calibrate's own probe)
CALIBRATION_SEED = 2000  # seeds of the calibration prompts; the evaluation uses 0, 1, ...
DEFAULT_BUDGETS = "50:200,100:400,200:800,400:1600,1000:6096"  # vertical:slash, cheapest first
DEFAULT_MASSES = "0.5,0.7,0.8,0.9,0.95"  # attention mass kept below the switch layer, cheapest first


def min_samples(identical: float, z: float = Z_SCORE) -> int:
    """The fewest prompts whose Wilson lower bound can reach ``identical``: with all ``n`` answers
    identical the bound is ``n / (n + z**2)``."""
    n = max(1, math.floor(z * z * identical / (1 - identical)))
    while wilson_interval(n, n, z)[0] < identical:
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class Criterion:
    """What a configuration must show over ``samples`` prompts to pass (see the module docstring)."""

    identical: float = 0.95
    max_kl: float = 1e-3
    samples: int = 120

    def __post_init__(self) -> None:
        if not 0 < self.identical < 1:
            raise ValueError(f"--identical must be in (0, 1), got {self.identical}")
        if not 0 < self.max_kl < math.inf:
            raise ValueError(f"--max-kl must be > 0 and finite, got {self.max_kl}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"--samples must be an int >= 1, got {self.samples!r}")
        need = min_samples(self.identical)
        if self.samples < need:
            bound = wilson_interval(self.samples, self.samples)[0]
            raise ValueError(f"--samples {self.samples} cannot show --identical {self.identical}: even "
                             f"{self.samples}/{self.samples} identical answers have a Wilson lower bound of "
                             f"{bound:.3f}; use --samples >= {need} or a lower --identical")

    def verdict(self, identical: int, seen: int, kl_sum: float) -> bool | None:
        """Pass (True) or fail (False) once certain after ``seen`` prompts, else None."""
        if kl_sum > self.max_kl * self.samples:
            return False
        if wilson_interval(identical + self.samples - seen, self.samples)[0] < self.identical:
            return False
        return True if seen == self.samples else None


def measure(one: Callable[[int], tuple[bool, float]], criterion: Criterion,
            on_sample: Callable[[int, int], None] | None = None) -> tuple[bool, list[bool], list[float]]:
    """Call ``one(k)`` -> ``(identical, kl)`` for prompts ``k = 0, 1, ...`` until ``criterion``'s verdict
    is certain; returns it with the per-prompt results. ``on_sample(seen, identical)`` reports progress."""
    identical: list[bool] = []
    kls: list[float] = []
    verdict = None
    while verdict is None:
        same, kl = one(len(identical))
        identical.append(bool(same))
        kls.append(float(kl))
        if on_sample is not None:
            on_sample(len(identical), sum(identical))
        verdict = criterion.verdict(sum(identical), len(identical), math.fsum(kls))
    return verdict, identical, kls


def search(count: int, passes: Callable[[int], bool], start: int | None = None) -> int:
    """The earliest of candidates ``0..count`` for which ``passes`` holds, for a threshold predicate;
    candidate ``count`` (the fallback) passes by definition and is never tested.

    Starts at ``start`` (clamped to ``0..count-1``; None: plain bisection), gallops from it by doubling
    steps until a failing and a passing candidate bracket the answer, then bisects. Each candidate is
    tested at most once, always inside the current bracket, so for any predicate the result ``r``
    was measured to pass (or is ``count``) and ``r - 1`` was measured to fail (or ``r == 0``).
    """
    low, high = -1, count  # highest known failure, lowest known pass
    if start is not None and count > 0:
        first = min(max(start, 0), count - 1)
        step = 1
        if passes(first):
            high = first
            while high - low > 1:
                candidate = max(high - step, low + 1)
                if not passes(candidate):
                    low = candidate
                    break
                high, step = candidate, step * 2
        else:
            low = first
            while high - low > 1:
                candidate = min(low + step, high - 1)
                if passes(candidate):
                    high = candidate
                    break
                low, step = candidate, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def parse_budgets(spec: str, args: argparse.Namespace) -> list[VerticalSlash]:
    """``--budgets`` (``vertical:slash`` pairs, cheapest first) as layouts with the other vertical-slash
    options; each pair must keep at least the columns and diagonals of the one before it."""
    budgets: list[VerticalSlash] = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if not re.fullmatch(r"[0-9]+:[0-9]+", item):  # ASCII digits: str.isdigit() also takes "²"
            raise ValueError(f"--budgets: cannot read {item!r}; use vertical:slash pairs, e.g. {DEFAULT_BUDGETS}")
        vertical, _, slash = item.partition(":")
        try:
            budget = vertical_slash(args, int(vertical), int(slash))
        except ValueError as err:
            raise ValueError(f"--budgets {item}: {err}") from None
        if budgets and (budget.vertical < budgets[-1].vertical or budget.slash < budgets[-1].slash):
            raise ValueError(f"--budgets must grow: {item} keeps fewer columns or diagonals than the pair before "
                             "it (the search needs each budget to keep a superset of the previous one)")
        budgets.append(budget)
    if not budgets:
        raise ValueError(f"--budgets is empty; give vertical:slash pairs, e.g. {DEFAULT_BUDGETS}")
    return budgets


def parse_masses(spec: str) -> list[float]:
    """``--masses``: attention masses in ``(0, 1]``, each larger than the one before it."""
    masses: list[float] = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        try:
            mass = float(item)
        except ValueError:
            raise ValueError(f"--masses: cannot read {item!r}; use growing numbers in (0, 1], e.g. {DEFAULT_MASSES}") from None
        if not 0 < mass <= 1:
            raise ValueError(f"--masses: {item} is not in (0, 1]")
        if masses and mass <= masses[-1]:
            raise ValueError(f"--masses must grow: {item} after {masses[-1]:g} (the search needs each mass to keep "
                             "a superset of the previous one)")
        masses.append(mass)
    if not masses:
        raise ValueError(f"--masses is empty; give growing numbers in (0, 1], e.g. {DEFAULT_MASSES}")
    return masses


def shallow_ladder(args: argparse.Namespace) -> list[VerticalSlash | FlexPrefill]:
    """The shallow candidates of ``--shallow``, cheapest first: the ``--budgets`` ladder, or with
    ``--masses`` (always for flexprefill) a mass ladder capped by the last ``--budgets`` pair."""
    if args.shallow == "dense":
        for flag, value in (("--budgets", args.budgets), ("--masses", args.masses)):
            if value is not None:
                raise ValueError(f"{flag} needs --shallow vertical-slash or flexprefill (it would be ignored)")
        return []
    budgets = parse_budgets(DEFAULT_BUDGETS if args.budgets is None else args.budgets, args)
    if args.shallow == "vertical-slash" and args.masses is None:
        return budgets
    caps = budgets[-1]
    masses = parse_masses(DEFAULT_MASSES if args.masses is None else args.masses)
    if args.shallow == "vertical-slash":
        return [vertical_slash(args, caps.vertical, caps.slash, mass) for mass in masses]
    return [flexprefill(args, mass, caps.vertical, caps.slash) for mass in masses]


class Divergence:
    """Greedy answers of ``samples`` under a layout against dense, one prompt at a time; each dense
    answer is computed once and reused by every configuration."""

    def __init__(self, params: Params, tokenizer: object, samples: Sequence[tasks.Sample],
                 implementation: str | None = None, journal: Journal | None = None) -> None:
        self.params, self.implementation, self.journal = params, implementation, journal
        self.encoded = [tasks.encode(tokenizer, s) for s in samples]
        self.budgets = [s.max_new_tokens for s in samples]
        self.stop_ids = [i for i in (tokenizer.eos_token_id,) if i is not None]
        self.cache_room = max(self.budgets)
        self.dense: dict[int, tuple[np.ndarray, list[int]]] = {}
        self.dense_seconds: dict[int, float] = {}

    def _greedy(self, k: int, layout: Layout | None, follow: list[int] | None) -> tuple[np.ndarray, list[int]]:
        return greedy(self.params, self.encoded[k].prompt_ids, layout, max_new_tokens=self.budgets[k],
                      stop_ids=self.stop_ids, cache_room=self.cache_room, implementation=self.implementation,
                      follow=follow)

    def __call__(self, layout: Layout, k: int) -> tuple[bool, float]:
        """Whether prompt ``k``'s greedy answer under ``layout`` is dense's, and the first-token KL."""
        if k not in self.dense:
            recorded = self.journal.dense_answer(k) if self.journal is not None else None
            if recorded is not None:
                self.dense[k] = recorded
            else:
                started = time.perf_counter()
                self.dense[k] = self._greedy(k, None, None)
                self.dense_seconds[k] = time.perf_counter() - started
                if self.journal is not None:
                    self.journal.add_dense_answer(k, *self.dense[k])
        dense_first, dense_tokens = self.dense[k]
        first, tokens = self._greedy(k, layout, dense_tokens)
        return tokens == dense_tokens, kl_divergence(dense_first, first)


def _summary(name: str, layout: Layout, passed: bool, identical: list[bool], kls: list[float],
             seconds: list[float], criterion: Criterion) -> dict:
    """One configuration's record; ``seconds`` per prompt include the dense answer when this
    configuration was the first to use the prompt (``dense_seconds`` in the report gives those)."""
    count = sum(identical)
    return {"config": name, "layout": dataclasses.asdict(layout), "passed": passed, "samples": len(identical),
            "stopped_early": len(identical) < criterion.samples, "identical_count": count,
            "identical_to_dense": count / len(identical),
            "identical_to_dense_interval": list(wilson_interval(count, len(identical))),
            "first_token_kl_mean": float(np.mean(kls)), "first_token_kl_max": float(np.max(kls)),
            "identical": identical, "first_token_kl": kls, "seconds": seconds}


class Journal:
    """What a calibration has measured so far: the record of each decided configuration, one JSON line
    each after a first line of the run's settings, appended as each verdict is reached, and each dense
    answer, one ``.npz`` per prompt in a folder beside it (module docstring, "Resuming"). ``resume``:
    take those of an existing journal written under the same ``settings`` (other settings are refused:
    their answers would not be this run's); otherwise start a new one."""

    def __init__(self, path: Path, settings: dict, resume: bool) -> None:
        self.path, self.decided = path, {}
        self.answers = path.with_name(path.name + ".dense")  # dense's answer per prompt, one .npz each
        head = {"settings": json.loads(json.dumps(settings))}  # as read back: tuples become lists
        lines = path.read_text().splitlines() if resume and path.is_file() else []
        there = self._settings(lines[0]) if lines else None  # None: no journal, or not even its first line
        if there is not None:
            if there != head["settings"]:
                here = head["settings"]
                differ = "; ".join(f"{key}: {there.get(key)!r} there, {here.get(key)!r} here"
                                   for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key))
                raise ValueError(f"--resume: {path} was written under other settings ({differ}); drop --resume "
                                 "to start over")
            kept = lines[:1]
            for line in lines[1:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run stopped while writing it
                    break
                self.decided[self._key(record["layout"])] = record
                kept.append(line)
            if len(kept) < len(lines):  # drop the cut-off line, or the next record would be glued to it
                write_atomically(path, "".join(line + "\n" for line in kept))
        else:
            shutil.rmtree(self.answers, ignore_errors=True)
            write_atomically(path, json.dumps(head) + "\n")  # a stop leaves the old journal or the new one
        self.answers.mkdir(exist_ok=True)

    def dense_answer(self, k: int) -> tuple[np.ndarray, list[int]] | None:
        """Prompt ``k``'s dense answer (first-token logits, tokens) as an earlier run recorded it, or None."""
        file = self.answers / f"{k}.npz"
        if not file.is_file():
            return None
        with np.load(file) as saved:
            return saved["first"], saved["tokens"].tolist()

    def add_dense_answer(self, k: int, first: np.ndarray, tokens: list[int]) -> None:
        part = self.answers / f".{k}.part.npz"  # complete files only under the real name
        np.savez(part, first=first, tokens=np.asarray(tokens, np.int64))
        os.replace(part, self.answers / f"{k}.npz")

    def remove(self) -> None:
        """The run finished: its report holds everything the journal did."""
        self.path.unlink()
        shutil.rmtree(self.answers, ignore_errors=True)

    @staticmethod
    def _settings(line: str) -> dict | None:
        """The settings a journal's first line holds; None when that line is not whole (a journal written
        before the settings line was written atomically, or cut by hand)."""
        try:
            return json.loads(line)["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    @staticmethod
    def _key(layout: dict) -> str:
        return json.dumps(layout, sort_keys=True)

    def get(self, layout: Layout) -> dict | None:
        """The record of ``layout`` decided by an earlier run, or None."""
        return self.decided.get(self._key(dataclasses.asdict(layout)))

    def add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.decided[self._key(record["layout"])] = record


def search_layouts(candidates: Sequence[Layout], divergence: Callable[[Layout, int], tuple[bool, float]],
                   criterion: Criterion, start: int | None, progress: object | None = None,
                   journal: Journal | None = None) -> tuple[int, list[dict]]:
    """``search`` over ``candidates`` (most sparse first), each measured with ``measure`` on
    ``divergence(layout, k)`` (a ``Divergence``), or taken from ``journal`` where an earlier run decided
    it (and added to it otherwise); returns the chosen index (``len(candidates)``: none passed) and every
    record in test order."""
    measured: list[dict] = []

    def passes(index: int) -> bool:
        layout = candidates[index]
        label = detailed_name(layout)
        known = journal.get(layout) if journal is not None else None
        if known is not None:
            if progress is not None:
                progress.console.print(f"{label}: {known['identical_count']}/{known['samples']} identical, "
                                       f"{'pass' if known['passed'] else 'fail'} (from the journal)")
            measured.append({**known, "from_journal": True})  # measured by an earlier run, not this one
            return known["passed"]
        task = progress.add_task(label, total=criterion.samples) if progress is not None else None
        seconds: list[float] = []

        def one(k: int) -> tuple[bool, float]:
            started = time.perf_counter()
            result = divergence(layout, k)
            seconds.append(time.perf_counter() - started)
            return result

        def on_sample(seen: int, same: int) -> None:
            if progress is not None:
                progress.update(task, completed=seen, description=f"{label}: {same}/{seen} identical")

        passed, identical, kls = measure(one, criterion, on_sample)
        if progress is not None:
            verdict = "pass" if passed else f"fail ({len(identical)} prompts decided it)"
            progress.update(task, description=f"{label}: {sum(identical)}/{len(identical)} identical, {verdict}")
            if not progress.console.is_terminal:  # a log file gets one line per configuration
                progress.console.print(f"{label}: {sum(identical)}/{len(identical)} identical, mean KL "
                                       f"{np.mean(kls):.2e}, {verdict}")
        measured.append(_summary(label, layout, passed, identical, kls, seconds, criterion))
        if journal is not None:
            journal.add(measured[-1])
        return passed

    return search(len(candidates), passes, start), measured


def calibrate(params: Params, tokenizer: object, samples: Sequence[tasks.Sample], criterion: Criterion, *,
              start_layer: int | None, triangle: dict, budgets: Sequence[VerticalSlash | FlexPrefill] = (),
              switch_layer: int | None = None, implementation: str | None = None,
              progress: object | None = None, journal: Journal | None = None) -> dict:
    """The switch layer search from ``start_layer`` (the probe's), then, with ``budgets`` (a
    ``shallow_ladder``), the shallow search at the chosen layer; ``switch_layer`` skips the first search and takes that
    layer as chosen (e.g. from an earlier calibration). ``triangle``: the TriangleMix sizes.
    ``progress``: a ``rich.progress.Progress`` showing each configuration's prompts, or None;
    ``journal``: where decided configurations are recorded and, resuming, read. Returns the report dict."""
    if len(samples) != criterion.samples:
        raise ValueError(f"calibrate needs criterion.samples={criterion.samples} samples, got {len(samples)}")
    num_layers = params.config.num_layers
    divergence = Divergence(params, tokenizer, samples, implementation, journal)
    layers = [TriangleMix(s, **triangle) for s in range(num_layers)]
    if switch_layer is None:
        switch, switch_measured = search_layouts(layers, divergence, criterion, start_layer, progress, journal)
    else:
        TriangleMix(switch_layer, **triangle).check_layers(num_layers)
        switch, switch_measured = switch_layer, []
    chosen: Layout | None = layers[switch] if switch < num_layers else None
    shallow = None
    if budgets:
        ladder = [TriangleMix(switch, **triangle, shallow=b) for b in budgets]
        index, shallow_measured = search_layouts(ladder, divergence, criterion, None, progress, journal)
        if index < len(ladder):
            chosen = ladder[index]
        shallow = {"budgets": [dataclasses.asdict(b) for b in budgets], "measured": shallow_measured,
                   "recommended_budget": dataclasses.asdict(budgets[index]) if index < len(ladder) else None}
    every = switch_measured + (shallow["measured"] if shallow else [])
    chosen_summary = next((m for m in every if chosen is not None and m["layout"] == dataclasses.asdict(chosen)),
                          None)
    return {
        "criterion": {**dataclasses.asdict(criterion), "confidence": CONFIDENCE, "interval": "Wilson score",
                      "passes_when": "Wilson lower bound of the identical-answer rate >= identical and mean "
                                     "first-token KL <= max_kl, over all samples"},
        "search": "gallop from switch.start (the probe's layer unless --start-layer), then bisection (module "
                  "docstring of tmjax.calibrate)",
        "recommended_switch_layer": switch,
        "recommended_layout": None if chosen is None else dataclasses.asdict(chosen),
        "recommended_config": config_name(chosen),
        "recommendation": chosen_summary,
        "switch": {"start": start_layer, "given": switch_layer, "measured": switch_measured},
        "shallow": shallow,
        "prompts_measured": len(divergence.dense_seconds) + sum(m["samples"] for m in every
                                                                if not m.get("from_journal")),
        "dense_seconds": [divergence.dense_seconds[k] for k in sorted(divergence.dense_seconds)],
        "samples": [{"task": s.task, "seed": s.seed, "prompt_tokens": len(e.prompt_ids)}
                    for s, e in zip(samples, divergence.encoded)],
    }


def _read_probe(path: str) -> dict:
    """A probe.json's curve and recommendation, checked before any model work."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--probe {path}: cannot read it as JSON ({err})") from None
    keys = ("recommended_switch_layer", "middle_normalised", "threshold")
    missing = [key for key in keys if key not in data] if isinstance(data, dict) else list(keys)
    if missing:
        raise ValueError(f"--probe {path} lacks {missing}: give a probe.json written by tmjax probe")
    return {"source": path, **{key: data[key] for key in keys}}


def _probe_here(params: Params, tokenizer: object, names: Sequence[str], args: argparse.Namespace,
                max_tokens: int) -> dict:
    """Run the gradient probe on ``--probe-samples`` prompts per task (the probe's own tasks among
    ``names``), seeds from ``PROBE_SEED``: other prompts than the calibration's."""
    probe_tasks = [t for t in names if t in tasks.TASKS] or list(tasks.TASKS)
    samples = tasks.generate_suite(probe_tasks, samples_per_task=args.probe_samples, seed=PROBE_SEED,
                                   max_tokens=max_tokens, count=tasks.token_counter(tokenizer))
    encoded = [tasks.encode(tokenizer, s) for s in samples]
    result = probe_.probe(params, [(e.prompt_ids, e.answer_ids) for e in encoded], n_init=args.n_init,
                          n_local=args.n_local, n_last=args.n_last)
    report = result.to_json()
    return {"source": f"measured here on {len(samples)} prompts ({', '.join(probe_tasks)}; seeds from {PROBE_SEED})",
            **{key: report[key] for key in ("recommended_switch_layer", "middle_normalised", "threshold")}}


def recommendation_text(report: dict) -> str:
    """The printed recommendation: the layout and its measured interval and KL against the criterion."""
    criterion, chosen = report["criterion"], report["recommendation"]
    if chosen is None and report["switch"]["given"] is not None:
        return (f"no shallow budget passed at the given switch layer {report['switch']['given']}: keep "
                f"the shallow layers dense ({report['recommended_config']}, not measured in this run)")
    if chosen is None:
        return (f"no switch layer passed on {criterion['samples']} prompts: keep every layer dense "
                f"(required: Wilson lower bound >= {criterion['identical']:g}, mean first-token KL <= "
                f"{criterion['max_kl']:g})")
    low, high = chosen["identical_to_dense_interval"]
    text = (f"recommended: {chosen['config']}: {chosen['identical_count']}/{chosen['samples']} greedy answers "
            f"identical to dense ({100 * chosen['identical_to_dense']:.1f}%, Wilson 95% interval "
            f"{100 * low:.1f}-{100 * high:.1f}%; required lower bound >= {100 * criterion['identical']:g}%), mean "
            f"first-token KL {chosen['first_token_kl_mean']:.2e} (required <= {criterion['max_kl']:g})")
    if report["shallow"] is not None and report["shallow"]["recommended_budget"] is None:
        text += "; no shallow budget passed, so the shallow layers stay dense"
    return text


def plot(report: dict, path: Path, title: str) -> None:
    """Identical-answer rate (Wilson 95%) and mean first-token KL against the switch layer, the probe's
    normalised Middle Q-K curve beside it, and the shallow budget search if there was one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    criterion, probe_curve = report["criterion"], report["probe"]
    shallow = report["shallow"]
    fig, axes = plt.subplots(1, 3 if shallow else 2, figsize=(15 if shallow else 11, 4.5))

    def rates(ax: object, x: list, measured: list[dict]) -> None:
        for early, style in ((False, {}), (True, {"mfc": "none"})):
            picked = [(xi, m) for xi, m in zip(x, measured) if m["stopped_early"] == early]
            if not picked:
                continue
            rate = np.array([100 * m["identical_to_dense"] for _, m in picked])
            low, high = (np.array([100 * m["identical_to_dense_interval"][i] for _, m in picked]) for i in (0, 1))
            ax.errorbar([xi for xi, _ in picked], rate, yerr=[rate - low, high - rate], fmt="o", capsize=3,
                        color="C0", label="stopped early (fail certain)" if early else "all prompts", **style)
        ax.axhline(100 * criterion["identical"], color="C0", linestyle="--", label="required lower bound")
        ax.set_ylim(-2, 102)
        ax.set_ylabel("% greedy answers identical to dense")

    measured = sorted(report["switch"]["measured"], key=lambda m: m["layout"]["switch_layer"])
    layers = [m["layout"]["switch_layer"] for m in measured]
    ax = axes[0]
    rates(ax, layers, measured)
    kl_axis = ax.twinx()
    kl_axis.semilogy(layers, [max(m["first_token_kl_mean"], 1e-12) for m in measured], "x", color="C3",
                     label="mean first-token KL")
    kl_axis.axhline(criterion["max_kl"], color="C3", linestyle=":", label="max KL")
    kl_axis.set_ylabel("mean first-token KL (nats)", color="C3")
    ax.axvline(report["recommended_switch_layer"], color="grey", linestyle="-.",
               label=f"calibrated layer {report['recommended_switch_layer']}")
    ax.set_xlabel(f"switch layer (first Triangle layer; {report['num_layers']} = all dense)")
    ax.set_title(f"{title}: {criterion['samples']} prompts")
    lines = ax.get_legend_handles_labels()
    kl_lines = kl_axis.get_legend_handles_labels()
    ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], fontsize=7, loc="lower right")

    ax = axes[1]
    curve = np.asarray(probe_curve["middle_normalised"], np.float64)
    ax.semilogy(np.arange(curve.size)[curve > 0], curve[curve > 0], "-o", markersize=3, label="Middle Q-K / max")
    ax.axhline(probe_curve["threshold"], color="black", linestyle=":", label=f"probe threshold {probe_curve['threshold']:g}")
    ax.axvline(probe_curve["recommended_switch_layer"], color="C1", linestyle="--",
               label=f"probe's layer {probe_curve['recommended_switch_layer']}")
    ax.axvline(report["recommended_switch_layer"], color="grey", linestyle="-.",
               label=f"calibrated layer {report['recommended_switch_layer']}")
    ax.set_xlabel("layer")
    ax.set_title("gradient probe (dense model)")
    ax.legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_xlim(-0.5, report["num_layers"] + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    if shallow:
        ax = axes[2]
        picked = [shallow["budgets"].index(m["layout"]["shallow"]) for m in shallow["measured"]]
        rates(ax, picked, shallow["measured"])
        steps = [shallow_label(layout_from_json(b)) for b in shallow["budgets"]]
        ax.set_xticks(range(len(steps)), steps, fontsize=8)
        ax.set_xlabel(f"shallow budget, switch layer {report['recommended_switch_layer']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """``tmjax calibrate``: writes ``calibration.json`` and ``calibration.png`` to ``--out`` and prints
    the recommended layout with its interval."""
    parser = argparse.ArgumentParser(prog="tmjax calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="tmjax checkpoint folder (tmjax convert)")
    parser.add_argument("--identical", type=float, default=0.95,
                        help="required Wilson 95%% lower bound on the share of greedy answers identical to dense "
                             "(default 0.95)")
    parser.add_argument("--max-kl", type=float, default=1e-3,
                        help="required ceiling on the mean first-token KL from dense, nats (default 1e-3)")
    parser.add_argument("--samples", type=int, default=120,
                        help="held-out prompts per configuration (default 120); 0.95 needs >= 73")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="prompt + answer budget in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--tasks", default=",".join(tasks.ALL_TASKS),
                        help=f"comma-separated tasks, taken in turn (default: {','.join(tasks.ALL_TASKS)})")
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED,
                        help=f"seed of the first prompt of each task (default {CALIBRATION_SEED})")
    parser.add_argument("--probe", default=None,
                        help="a probe.json (tmjax probe) whose layer starts the search (default: probe here)")
    parser.add_argument("--probe-samples", type=int, default=1,
                        help="without --probe: probe prompts per task (default 1)")
    parser.add_argument("--n-init", type=int, default=8)
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--n-last", type=int, default=128)
    parser.add_argument("--shallow", choices=["dense", "vertical-slash", "flexprefill"], default="dense",
                        help="vertical-slash or flexprefill: also calibrate that method's budget for the layers "
                             "below the switch layer (default dense)")
    parser.add_argument("--start-layer", type=int, default=None,
                        help="start the switch-layer search here instead of at the probe's layer (e.g. where an "
                             "earlier run's verdicts bracket the answer); the guarantee is the same from any start")
    parser.add_argument("--switch-layer", type=int, default=None,
                        help="with --shallow vertical-slash: skip the switch-layer search and calibrate the budgets "
                             "at this layer (e.g. an earlier calibration's)")
    parser.add_argument("--budgets", default=None,
                        help=f"with --shallow vertical-slash: vertical:slash budgets, cheapest first, each "
                             f"keeping at least the previous one's (default {DEFAULT_BUDGETS}); with --masses "
                             "or flexprefill the last pair caps every step")
    parser.add_argument("--masses", default=None,
                        help="a ladder of growing attention masses (vertical-slash mass=, flexprefill gamma) instead "
                             f"of budgets (flexprefill's default {DEFAULT_MASSES})")
    add_vertical_slash_arguments(parser)
    add_flexprefill_arguments(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--implementation", default=None, choices=IMPLEMENTATIONS,
                        help="attention backend (default: the platform's)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--force", action="store_true", help="replace a calibration.json already in --out")
    parser.add_argument("--resume", action="store_true",
                        help="take the verdicts a stopped run with the same settings recorded in --out "
                             "(calibration.journal.jsonl) instead of measuring them again")
    command = ["tmjax", "calibrate", *(sys.argv[1:] if argv is None else argv)]
    parser.set_defaults(command=" ".join(shlex.quote(part) for part in command))
    return run_cli("tmjax calibrate", parser, _calibrate_cli, argv)


def _calibrate_cli(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    criterion = Criterion(args.identical, args.max_kl, args.samples)
    names = task_list(args.tasks)
    triangle = dict(n_init=args.n_init, n_local=args.n_local, n_last=args.n_last)
    TriangleMix(0, **triangle)  # validates the sizes
    budgets = shallow_ladder(args)
    if args.switch_layer is not None:
        if not budgets:
            raise ValueError("--switch-layer leaves nothing to calibrate without --shallow vertical-slash")
        TriangleMix(args.switch_layer, **triangle)  # validates it; the model's layer count is checked later
    if args.start_layer is not None:
        if args.switch_layer is not None:
            raise ValueError("--start-layer starts the switch-layer search, which --switch-layer skips: pass one")
        if args.start_layer < 0:
            raise ValueError(f"--start-layer must be >= 0, got {args.start_layer}")
    if args.probe_samples < 1:
        raise ValueError(f"--probe-samples must be >= 1, got {args.probe_samples}")
    out = output_folder(args.out)
    if (out / "calibration.json").exists() and not args.force:
        raise ValueError(f"--out {args.out} already holds a calibration.json; pass --force to replace it, or "
                         "choose another --out")
    probe_curve = _read_probe(args.probe) if args.probe else None
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint {args.checkpoint} is not a folder; convert a model with tmjax convert")
    layers = checkpoint.read_config(args.checkpoint).num_layers
    if args.switch_layer is not None and args.switch_layer > layers:
        raise ValueError(f"--switch-layer must be in 0..{layers} (the model has {layers} layers), "
                         f"got {args.switch_layer}")
    if args.start_layer is not None and args.start_layer >= layers:
        raise ValueError(f"--start-layer must be in 0..{layers - 1} (the model has {layers} layers), "
                         f"got {args.start_layer}")
    started = time.perf_counter()
    params, tokenizer, name = load_model(args.checkpoint, args.dtype)
    num_layers = params.config.num_layers
    max_tokens = args.max_tokens or params.config.max_position_embeddings
    if probe_curve is None:
        probe_curve = _probe_here(params, tokenizer, names, args, max_tokens)
    if len(probe_curve["middle_normalised"]) != num_layers:
        raise ValueError(f"--probe {args.probe} has {len(probe_curve['middle_normalised'])} layers, the model "
                         f"{num_layers}: probe this model")
    samples = tasks.generate_mixed(names, total=criterion.samples, seed=args.seed, max_tokens=max_tokens,
                                   count=tasks.token_counter(tokenizer))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "force", "resume", "command")}
    journal = Journal(out / "calibration.journal.jsonl", {**settings, "probe_layer": probe_curve["recommended_switch_layer"]},
                      args.resume)
    with Progress(*columns, console=Console(stderr=True)) as progress:
        start = probe_curve["recommended_switch_layer"] if args.start_layer is None else args.start_layer
        report = calibrate(params, tokenizer, samples, criterion, start_layer=start,
                           triangle=triangle, budgets=budgets, switch_layer=args.switch_layer,
                           implementation=args.implementation, progress=progress, journal=journal)
    switch = report["recommended_switch_layer"]
    middle = probe_curve["middle_normalised"]
    probe_curve = {**probe_curve, "threshold_range_for_calibrated": probe_.threshold_ranges(middle)[switch],
                   "middle_share_from_calibrated": float(probe_.middle_share_from(middle)[switch])}
    report = {"model": name, "dtype": str(params.weights["norm"]["scale"].dtype), "num_layers": num_layers,
              "max_tokens": max_tokens, "tasks": names, "seed": args.seed, "command": args.command,
              "seconds": round(time.perf_counter() - started, 1), "probe": probe_curve, **report}
    write_atomically(out / "calibration.json", json.dumps(report, indent=2))
    journal.remove()
    plot(report, out / "calibration.png", f"{name}, {max_tokens} tokens")
    print(recommendation_text(report))
    print(f"wrote {out / 'calibration.json'} and {out / 'calibration.png'}")
    return 0
