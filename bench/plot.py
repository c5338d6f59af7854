"""Plot attention time and TTFT vs length from the JSON that bench/attention.py, bench/ttft.py and the
HF peer (`peers.py hf`) wrote, and write the combined TTFT table.

    python bench/plot.py --attention bench/results/attention-...json --ttft bench/results/ttft-...json \
        --hf bench/results/peers-hf.json --out bench/results/performance-H100-20261122
    python bench/plot.py --authors bench/results/minference-H200-20261204/minference-vs-tmjax.json \
        --out bench/results/minference-H200-20261204/ttft-vs-authors
(the second: our TTFT beside the authors' TriangleMix, from ``bench/peers/minference_table.py``'s JSON)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ATTENTION_SERIES = [  # (label, our backend or a peer's system name, pattern)
    ("tmjax triangle (mosaic_gpu)", "mosaic_gpu", "triangle"),
    ("tmjax triangle (triton)", "triton", "triangle"),
    ("FlexAttention triangle", "torch flex_attention", "triangle"),
    ("cuDNN-composed triangle", "jax cudnn composed triangle", "triangle"),
    ("FA3-composed triangle", "flash-attn3-jax composed triangle", "triangle"),
    ("tmjax dense (causal table)", "mosaic_gpu", "dense-causal"),
    ("cuDNN dense", "jax cudnn", "dense-causal"),
    ("FA3 dense", "flash-attn3-jax dense causal", "dense-causal"),
]
# Records made before rows said where their tuning came from (2026-11-23 and earlier) name the table's tuning
# of that day in the system name.
OLDER_NAMES = {("mosaic_gpu", "triangle"): "tmjax mosaic_gpu bkv64 st3 chunk4096", ("triton", "triangle"): "tmjax triton",
               ("mosaic_gpu", "dense-causal"): "tmjax mosaic_gpu causal table"}


def series_points(rows: list[dict], who: str, pattern: str) -> list[tuple[int, float]]:
    """(length, ms) of one series: for our backends the rows the tuning table chose (what
    ``implementation=None`` runs, whatever tuning the row's name spells), for a peer its system's rows."""
    if (who, pattern) in OLDER_NAMES:
        picked = [r for r in rows if r.get("implementation") == who and r.get("tuning_source") == "table"]
        if not picked:
            picked = [r for r in rows if r["system"] == OLDER_NAMES[who, pattern]]
    else:
        picked = [r for r in rows if r["system"] == who]
    return sorted((r["n"], r["ms"]) for r in picked if r["pattern"] == pattern and r.get("ms"))


def ttft_rows(ttft: dict, hf: list[dict]) -> list[dict]:
    """One row per system and length; the HF peer's figure is the median of its runs after the first."""
    rows = [dict(system=r["system"], n=r["n"], s=r["median_s"], peak=r.get("peak_gib")) for r in ttft["rows"]]
    rows += [dict(system="HF transformers SDPA dense", n=r["n"], s=statistics.median(r["all"][1:]),
                  peak=r.get("peak_gib")) for r in hf if r.get("all")]
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lengths = sorted({r["n"] for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {(r["system"], r["n"]): r for r in rows}
    lines = [f"TTFT (s), Llama-3.1-8B shapes, random weights, batch 1, bf16; {meta['device']}, {meta['date']}, "
             f"jax {meta['jax']}. Command: `{meta['command']}`; HF peer: `peers.py hf` on the same GPU, back to back.",
             "", "| system | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | peak GiB at the longest |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for system in systems:
        cells = [f"{by[system, n]['s']:.2f}" if (system, n) in by and by[system, n]["s"] else "-" for n in lengths]
        peak = by.get((system, lengths[-1]), {}).get("peak")
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {'' if peak is None else f'{peak:.1f}'} |")
    dense = {n: by[("tmjax dense", n)]["s"] for n in lengths if ("tmjax dense", n) in by}
    hf = {n: by[("HF transformers SDPA dense", n)]["s"] for n in lengths if ("HF transformers SDPA dense", n) in by}
    tri = next((s for s in systems if s.startswith("tmjax TriangleMix")), None)
    if tri:
        lines.append(f"| {tri} / tmjax dense | " + " | ".join(
            f"{by[tri, n]['s'] / dense[n]:.2f}x" if n in dense else "-" for n in lengths) + " | |")
    lines.append("| tmjax dense / HF dense | " + " | ".join(
        f"{dense[n] / hf[n]:.2f}x" if n in dense and n in hf else "-" for n in lengths) + " | |")
    return "\n".join(lines) + "\n"


def plot_authors(table: dict, out: str) -> None:
    """TTFT vs length, ours (solid) and the authors' MInference code (dashed), one colour per configuration."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    configs = list(dict.fromkeys(r["config"] for r in table["rows"]))
    for colour, config in zip(("C0", "C1", "C2", "C3"), configs):
        rows = sorted((r for r in table["rows"] if r["config"] == config), key=lambda r: r["n"])
        for side, style in (("ours", "-"), ("theirs", "--")):
            pts = [(r["n"] / 1024, r[f"{side}_s"]) for r in rows if r.get(f"{side}_s")]
            name = "tmjax" if side == "ours" else "authors' MInference (patched, see record)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, marker="o", label=f"{name}: {config}")
    meta = table["ours_meta"]
    ax.set(xlabel="tokens (K)", ylabel="seconds (median)",
           title=f"TTFT, Llama-3.1-8B shapes (random weights), {meta['device']}, {meta['date']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention")
    parser.add_argument("--ttft")
    parser.add_argument("--hf")
    parser.add_argument("--authors", help="minference-vs-tmjax.json: plot ours beside the authors' code instead")
    parser.add_argument("--out", required=True, help="path prefix for .png and -ttft.md")
    args = parser.parse_args()
    if args.authors:
        plot_authors(json.loads(Path(args.authors).read_text()), args.out)
        return
    if not (args.attention and args.ttft and args.hf):
        parser.error("--attention, --ttft and --hf are required (or --authors)")
    attention = json.loads(Path(args.attention).read_text())
    ttft = json.loads(Path(args.ttft).read_text())
    rows = ttft_rows(ttft, json.loads(Path(args.hf).read_text()))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, who, pattern in ATTENTION_SERIES:
        pts = series_points(attention["rows"], who, pattern)
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                     linestyle="-" if pattern == "triangle" else "--")
    ax1.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms (median)",
            title=f"One attention layer, Llama-3.1-8B heads, bf16\n{attention['device']}, jax {attention['jax']}")
    ax1.legend(fontsize=8)
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["n"], r["s"]) for r in rows if r["system"] == system and r["s"])
        ax2.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=system)
    ax2.set(xlabel="tokens (K)", ylabel="seconds (median)",
            title=f"Time to first token, Llama-3.1-8B shapes (random weights)\n{ttft['meta']['device']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)
    Path(f"{args.out}-ttft.md").write_text(markdown(rows, ttft["meta"]))
    print(Path(f"{args.out}-ttft.md").read_text())


if __name__ == "__main__":
    main()
