"""Ours beside the authors' TriangleMix: one JSON + markdown table from a run of ``bench/ttft.py`` (ours)
and ``minference_ttft.py`` (theirs) on the same GPU, with ``minference_agree.py``'s check above it.

Each side is read from its JSON, or, when a step was cut short before writing it, from the ``ROW {...}``
lines of its log. Ratios are ours / theirs per length and configuration (< 1: ours faster), each side
also against its own dense row.

    python3 bench/peers/minference_table.py --ours OUT/ours/ttft.json --theirs OUT/minference-ttft.json \\
        --agree OUT/minference-agree.json --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (label, our config, their config)
PAIRS = (("dense", "dense", "dense"), ("TriangleMix", "tm", "tri_mix"),
         ("TriangleMix + vertical-slash", "tm+vs", "tri_mix_minference"))


def write_json(path: Path, obj: dict) -> None:
    """Whole-file write: a temporary beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def read_rows(path: str | None) -> tuple[dict, list[dict]]:
    """(meta, rows) of a result JSON, or (``{}``, rows) from a log's ``ROW {json}`` lines; nothing -> ({}, [])."""
    if not path or not Path(path).is_file():
        return {}, []
    text = Path(path).read_text()
    try:
        saved = json.loads(text)
        return saved.get("meta", {}), saved["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        rows = []
        for line in text.splitlines():
            if line.startswith("ROW {"):
                try:
                    rows.append(json.loads(line[4:]))
                except json.JSONDecodeError:
                    continue
        return {}, rows


def our_config(system: str) -> str | None:
    """The configuration of one of ``bench/ttft.py``'s rows, from its system name."""
    if system == "tmjax dense":
        return "dense"
    if system.startswith("tmjax TriangleMix("):
        return "tm+vs" if "+ vertical-slash" in system else "tm"
    return None


def compare(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """One row per (length, configuration) that either side measured."""
    mine = {(r["n"], our_config(r["system"])): r for r in ours}
    their = {(r["n"], r["config"]): r for r in theirs}
    lengths = sorted({n for n, _ in mine} | {n for n, _ in their})
    table = []
    for n in lengths:
        for label, ours_key, theirs_key in PAIRS:
            a, b = mine.get((n, ours_key)), their.get((n, theirs_key))
            if a is None and b is None:
                continue
            row = {"n": n, "config": label, "ours_system": a and a["system"], "theirs_system": b and b["system"],
                   "ours_s": a and a.get("median_s"), "theirs_s": b and b.get("median_s"),
                   "ours_error": a and a.get("error"), "theirs_error": b and b.get("error")}
            row["ours_over_theirs"] = row["ours_s"] / row["theirs_s"] if row["ours_s"] and row["theirs_s"] else None
            for side, rows_by_key in (("ours", mine), ("theirs", their)):
                dense, own = rows_by_key.get((n, "dense")), row[f"{side}_s"]
                row[f"{side}_vs_own_dense"] = (own / dense["median_s"] if ours_key != "dense" and own and dense
                                               and dense.get("median_s") else None)
            table.append(row)
    return table


def _s(x: float | None, error: str | None = None) -> str:
    if x is None:
        return "failed" if error else "-"
    return f"{x:.3f}"


def _x(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def render(table: list[dict], ours_meta: dict, theirs_meta: dict, agree: dict | None) -> list[str]:
    src = theirs_meta.get("source", {})
    lines = [f"# Ours vs the authors' TriangleMix, TTFT, {theirs_meta.get('device') or ours_meta.get('device', '?')}, "
             f"{theirs_meta.get('date') or ours_meta.get('date', '?')}", "",
             f"Theirs: {src.get('origin', 'microsoft/MInference')} @ {src.get('commit', '?')}, patched at run time "
             "(list below), HF LlamaForCausalLM with Llama-3.1-8B shapes and RANDOM weights, bf16, "
             f"torch {theirs_meta.get('torch', '?')}, transformers {theirs_meta.get('transformers', '?')}, "
             f"triton {theirs_meta.get('triton', '?')}; dense kernel: torch SDPA "
             f"{(theirs_meta.get('dense_kernel') or {}).get('sdpa_backend', '?')}.",
             f"Ours: {ours_meta.get('command', 'bench/ttft.py')} (jax {ours_meta.get('jax', '?')}).",
             "Both: one prompt of random token ids, last-position logits, no cache; median of timed runs after "
             "a warm-up. Random weights make vertical-slash picks scatter (its worst case) on both sides.", ""]
    if agree:
        lines += [f"One-layer check at {agree['length']} tokens (q x{agree['q_scale']}): relative L2 vs float32 dense "
                  f"under the triangle mask: theirs {agree['rel_l2_theirs_vs_float32']:.2e}, ours "
                  f"{agree['rel_l2_ours_vs_float32']:.2e}; ours vs theirs (all rows) "
                  f"{agree['rel_l2_ours_vs_theirs_all_rows']:.2e}: {'agree' if agree['agree'] else 'DISAGREE'} "
                  f"(tolerance {agree['tolerance']}).", ""]
    else:
        lines += ["One-layer check: no result (did not run or failed; see its log).", ""]
    if theirs_meta.get("error"):
        lines += [f"Their code did not get to timing: {theirs_meta['error']}", ""]
    lines += ["| tokens | configuration | ours s | theirs s | ours / theirs | ours vs own dense "
              "| theirs vs own dense |",
              "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['n']} | {r['config']} | {_s(r['ours_s'], r['ours_error'])} | "
                     f"{_s(r['theirs_s'], r['theirs_error'])} | {_x(r['ours_over_theirs'])} | "
                     f"{_x(r['ours_vs_own_dense'])} | {_x(r['theirs_vs_own_dense'])} |")
    failures = [(r["n"], r["config"], side, r[f"{side}_error"]) for r in table for side in ("ours", "theirs")
                if r[f"{side}_error"]]
    if failures:
        lines += ["", "Failures:"] + [f"- {n} {c} ({side}): {e}" for n, c, side, e in failures]
    if theirs_meta.get("patches"):
        lines += ["", "Patches applied to their code at run time:"] + [f"- {p}" for p in theirs_meta["patches"]]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", nargs="+", default=[], help="our ttft.json, then its log as a fallback")
    parser.add_argument("--theirs", nargs="+", default=[], help="minference-ttft.json, then its log as a fallback")
    parser.add_argument("--agree", default=None, help="minference-agree.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    def first(paths):  # the first file's meta that has one, the first file's rows that has some
        metas, rows = zip(*[read_rows(p) for p in paths]) if paths else ((), ())
        return next((m for m in metas if m), {}), next((r for r in rows if r), [])

    ours_meta, ours = first(args.ours)
    theirs_meta, theirs = first(args.theirs)
    agree = json.loads(Path(args.agree).read_text()) if args.agree and Path(args.agree).is_file() else None
    table = compare(ours, theirs)
    out = Path(args.out)
    record = {"ours_meta": ours_meta, "theirs_meta": theirs_meta, "agree": agree, "rows": table,
              "ours_rows": ours, "theirs_rows": theirs}
    write_json(out / "minference-vs-tmjax.json", record)
    lines = render(table, ours_meta, theirs_meta, agree)
    tmp = out / "minference-vs-tmjax.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "minference-vs-tmjax.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
