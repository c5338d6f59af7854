"""One-layer attention timings on a GPU: our kernels beside cuDNN and the peers, in one run.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, batch 1, triangle
n_init 8 / n_local 512 / n_last 128. Rows: our triangle (mosaic_gpu with the tuning table's entry and
another block setting, triton), our causal kernel, cuDNN dense causal via
``jax.nn.dot_product_attention``, and, when the
peer scripts are found (``--peers DIR``), the cuDNN-composed triangle (``peers.py composed``) and
PyTorch FlexAttention's triangle (``anchors.py``), and FlashAttention-3 through ``flash-attn3-jax``
when it imports (``bench/fa3_peer.py``: dense causal, sliding window, FA3-composed triangle; head_dim
128 only). ``--heads 9,3,64`` runs SmolLM2's heads instead. Medians; every JAX row is checked against a
dense float32 reference on a slice of rows first. Each of our rows records the backend and the
tuning it ran (``implementation``, ``tuning``; ``tuning_source``: ``table`` when read from
``tmjax/pallas_kernels/tuning_tables``). ``--sweep`` times mosaic_gpu over a grid of tunings
(triangle and causal); ``--variants 'items=2;guard=nonfinite'`` adds the table's tunings with those
fields changed (triangle, band and causal); ``--write-tuning FILE`` then writes the packaged table with the fastest
tuning of each pattern at this run's device, head_dim and group (entries for other keys kept), to
be copied over ``tmjax/pallas_kernels/tuning_tables/mosaic_gpu.json`` after review. Writes
``attention-<device>-<date>.json`` and ``.md`` to ``--out``.

    python bench/attention.py --out bench/results --peers .carry/peers
    python bench/attention.py --seqs 32768,131072 --sweep --write-tuning /tmp/out/mosaic_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import itertools
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fa3_peer beside this file

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tmjax.pallas_kernels import reference  # noqa: E402

HQ, HKV, D = 32, 8, 128
N_INIT, N_LOCAL, N_LAST = 8, 512, 128


def median_ms(fn, *args, min_time_s: float = 0.5) -> float:
    """Median time per call: calls issued back to back in groups, then one wait per group."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    per_group = max(1, min(20, int(0.02 / max(one, 1e-6))))
    groups = max(5, min(30, int(min_time_s / max(one * per_group, 1e-6))))
    times = []
    for _ in range(groups):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(per_group)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / per_group)
    return float(np.median(times)) * 1e3


def triangle_keys(n: int) -> int:
    """Number of visible (query, key) pairs of the triangle mask, for the FLOP count."""
    i = np.arange(n)
    outside_window_sinks = np.clip(np.minimum(N_INIT, i - N_LOCAL + 1), 0, None)
    band = np.minimum(i + 1, N_LOCAL) + outside_window_sinks
    return int(np.where(i >= n - N_LAST, i + 1, band).sum())


def check_rows(fn, q, k, v, mask_rows_fn) -> float:
    """Relative L2 error of ``fn`` on a sample of rows against the dense float32 reference."""
    n = q.shape[1]
    rng = np.random.default_rng(0)
    rows = np.unique(np.concatenate([np.arange(64), rng.integers(0, n, 192), np.arange(n - N_LAST - 32, n)]))
    out = np.asarray(fn(q, k, v)[:, rows], np.float32)
    ref = np.asarray(reference.masked_attention(q[:, rows], k, v, mask_rows_fn(rows, n)), np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def triangle_rows_mask(rows, n):
    i, j = rows[:, None], np.arange(n)[None, :]
    return (j <= i) & ((j < N_INIT) | (i - j < N_LOCAL) | (i >= n - N_LAST))


def causal_rows_mask(rows, n):
    return np.arange(n)[None, :] <= rows[:, None]


TRI = dict(n_init=N_INIT, n_local=N_LOCAL, n_last=N_LAST)
# Patterns of the rows -> the tuning table's pattern key.
TABLE_PATTERN = {"triangle": "triangle", "band": "triangle", "dense-causal": "causal"}


def _ours(implementation: str, pattern: str, tuning=None):
    """Our attention on ``implementation`` with ``tuning`` (None: the packaged table's entry)."""
    import tmjax

    if pattern == "dense-causal":
        return lambda q, k, v: tmjax.causal_attention(q, k, v, implementation=implementation, tuning=tuning)
    sizes = dict(TRI, n_last=0) if pattern == "band" else TRI
    return lambda q, k, v: tmjax.triangle_attention(q, k, v, **sizes, implementation=implementation, tuning=tuning)


def _extras(tuning) -> str:
    """The fields past block_kv, stages and kv_chunk that differ from ``Tuning()``, as a name suffix."""
    default = type(tuning)()
    named = (("items", "items{}"), ("guard", "guard-{}"), ("sink_keys", "sinks{}"), ("edges", "edges"))
    return "".join(f" {form.format(getattr(tuning, field))}" for field, form in named
                   if getattr(tuning, field) != getattr(default, field))


def _label(tuning) -> str:
    return f"bkv{tuning.block_kv} st{tuning.stages} chunk{tuning.kv_chunk}{_extras(tuning)}"


def parse_variants(text: str) -> list[dict]:
    """``"items=2;items=4,guard=nonfinite"`` -> ``[{"items": 2}, {"items": 4, "guard": "nonfinite"}]``."""
    variants = []
    for part in filter(None, text.split(";")):
        fields = dict(item.split("=", 1) for item in part.split(","))
        variants.append({key: int(value) if value.isdigit() else value for key, value in fields.items()})
    return variants


def our_systems(sweep: bool, variants: list[dict] = ()):
    """``(name, pattern, fn, implementation, tuning or None)`` rows; None: the table's entry. Names
    carry the tuning (the table's rows too, so they read as in earlier runs). ``variants``: the table's
    triangle, band and causal tunings again with each of these field overrides (``parse_variants``)."""
    from tmjax import attention
    from tmjax.pallas_kernels import mosaic_gpu

    q, kv = (jax.ShapeDtypeStruct((1, 128, h, D), jnp.bfloat16) for h in (HQ, HKV))
    table = attention.kernel("mosaic_gpu", "triangle", q, kv, kv).tuning
    systems = [(f"tmjax mosaic_gpu {_label(table)}", "triangle", _ours("mosaic_gpu", "triangle"), "mosaic_gpu", None)]
    tunings = [mosaic_gpu.Tuning(64, 4, 2048)]
    if sweep:
        tunings = [mosaic_gpu.Tuning(b, s, c) for b, s, c in itertools.product((64, 128), (2, 3, 4), (2048, 4096))]
    for tuning in tunings:
        if tuning != table:
            systems.append((f"tmjax mosaic_gpu {_label(tuning)}", "triangle", _ours("mosaic_gpu", "triangle", tuning),
                            "mosaic_gpu", tuning))
    systems.append((f"tmjax mosaic_gpu bkv{table.block_kv} st{table.stages}{_extras(table)} band only (n_last=0)", "band",
                    _ours("mosaic_gpu", "band"), "mosaic_gpu", None))
    systems.append(("tmjax triton", "triangle", _ours("triton", "triangle"), "triton", None))
    systems.append(("tmjax mosaic_gpu causal table", "dense-causal", _ours("mosaic_gpu", "dense-causal"), "mosaic_gpu", None))
    causal = attention.kernel("mosaic_gpu", "causal", q, kv, kv).tuning
    if sweep:
        for b, s in itertools.product((64, 128), (2, 3)):
            tuning = mosaic_gpu.Tuning(b, s, 4096)
            if tuning != causal:
                systems.append((f"tmjax mosaic_gpu causal table {_label(tuning)}", "dense-causal",
                                _ours("mosaic_gpu", "dense-causal", tuning), "mosaic_gpu", tuning))
    for fields in variants:
        for pattern, base in (("triangle", table), ("band", table), ("dense-causal", causal)):
            unused = {"band": {"kv_chunk"}, "dense-causal": {"kv_chunk", "sink_keys"}}.get(pattern, set())  # no last rows, no sinks
            used = {k: v for k, v in fields.items() if k not in unused}
            try:
                tuning = dataclasses.replace(base, **used)
            except ValueError as err:  # e.g. sink_keys=64 on a table entry of 64-key blocks
                print(f"variant {fields} skipped for the {pattern} entry {base}: {err}", flush=True)
                continue
            if tuning != base and not any(s[1] == pattern and s[4] == tuning for s in systems):
                suffix = {"triangle": "", "band": " band only (n_last=0)", "dense-causal": ""}[pattern]
                prefix = "tmjax mosaic_gpu causal table " if pattern == "dense-causal" else "tmjax mosaic_gpu "
                systems.append((f"{prefix}{_label(tuning)}{suffix}", pattern, _ours("mosaic_gpu", pattern, tuning),
                                "mosaic_gpu", tuning))
    systems.append(("jax cudnn", "dense-causal", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), None, None))
    return systems


def tuning_record(implementation: str | None, pattern: str, tuning, q, k) -> dict:
    """What a row records about its tuning: the backend, the fields, and where they came from."""
    if implementation is None:
        return {}
    from tmjax import attention

    source = "table" if tuning is None else "argument"
    if tuning is None:
        tuning = attention.kernel(implementation, TABLE_PATTERN[pattern], q, k, k).tuning
    return dict(implementation=implementation, tuning=dataclasses.asdict(tuning), tuning_source=source)


def write_tuning(path: str, rows: list[dict], device: str) -> None:
    """The mosaic_gpu tuning table with, for each pattern timed here, the fastest row's tuning at this
    device, head_dim and group (replacing an entry of the same key), every other entry and the density
    thresholds kept."""
    from tmjax.pallas_kernels import tuning as tuning_tables

    key = dict(device=device, head_dim=D, group=HQ // HKV)
    entries = [e for e in tuning_tables.table("mosaic_gpu")]
    for pattern in ("triangle", "causal"):
        timed = [r for r in rows if r.get("implementation") == "mosaic_gpu" and r.get("ms")
                 and TABLE_PATTERN.get(r["pattern"]) == pattern and r["pattern"] != "band"]
        if not timed:
            continue
        entries = [e for e in entries if {k: e.get(k, "*") for k in (*key, "pattern")} != dict(key, pattern=pattern)]
        by_tuning: dict = {}
        for r in timed:  # a tuning's time: its median over the lengths it ran, summed
            by_tuning.setdefault(json.dumps(r["tuning"], sort_keys=True), []).append(r["ms"])
        best = min(by_tuning, key=lambda t: sum(by_tuning[t]))
        entries.append(dict(key, pattern=pattern, tuning=json.loads(best),
                            source=f"bench/attention.py --sweep, {device}, lengths {sorted({r['n'] for r in timed})}, "
                                   f"summed medians {sum(by_tuning[best]):.3f} ms"))
    with open(path, "w") as fh:
        json.dump(dict(backend="mosaic_gpu", about="written by bench/attention.py --write-tuning; see "
                       "tmjax.pallas_kernels.tuning", entries=entries,
                       density=list(tuning_tables.table("mosaic_gpu", "density"))), fh, indent=1)


def dump_hlo(out_dir: str, n: int) -> None:
    """The optimised HLO of the mosaic_gpu triangle at length ``n`` (to look for copies of the output)."""
    shapes = [jax.ShapeDtypeStruct((1, n, h, D), jnp.bfloat16) for h in (HQ, HKV, HKV)]
    fn = jax.jit(_ours("mosaic_gpu", "triangle"))
    text = fn.lower(*shapes).compile().as_text()
    with open(os.path.join(out_dir, f"hlo-mosaic-triangle-{n}.txt"), "w") as fh:
        fh.write(text)


def fa3_systems(log) -> list:
    """The FlashAttention-3 peer's systems, or none (with a row saying why) when it cannot load."""
    try:
        import fa3_peer

        return fa3_peer.systems(N_INIT, N_LOCAL, N_LAST)
    except Exception as ex:  # optional peer: record why it is missing, run the rest
        log(dict(system="flash-attn3-jax (not loaded)", ms=None, note=repr(ex)[:400]))
        return []


def run_ours(seqs, rows_out, log, sweep=False, variants=()):
    extra = [(name, pattern, fn, None, None) for name, pattern, fn in (fa3_systems(log) if D == 128 else [])]
    for n in seqs:
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(n), 3)
        q = jax.random.normal(kq, (1, n, HQ, D), jnp.bfloat16)
        k = jax.random.normal(kk, (1, n, HKV, D), jnp.bfloat16)
        v = jax.random.normal(kv, (1, n, HKV, D), jnp.bfloat16)
        for name, pattern, fn, implementation, tuning in our_systems(sweep, variants) + extra:
            row = dict(system=name, pattern=pattern, n=n)
            try:
                row.update(tuning_record(implementation, pattern, tuning, q, k))
                jfn = jax.jit(fn)
                t0 = time.perf_counter()
                jax.block_until_ready(jfn(q, k, v))
                row["compile_s"] = time.perf_counter() - t0
                if pattern != "band":
                    mask_fn = triangle_rows_mask if pattern == "triangle" else causal_rows_mask
                    row["rel_err"] = check_rows(jfn, q, k, v, mask_fn)
                row["ms"] = median_ms(jfn, q, k, v)
                if pattern != "band":
                    pairs = triangle_keys(n) if pattern == "triangle" else n * (n + 1) // 2
                    row["tflops"] = 4 * HQ * D * pairs / (row["ms"] * 1e-3) / 1e12
            except Exception as ex:  # a failing system is recorded, the run goes on
                traceback.print_exc()
                row["ms"] = None
                row["note"] = repr(ex)[:400]
            rows_out.append(row)
            log(row)
        del q, k, v


def run_peers(peers_dir, seqs, rows_out, log):
    """FlexAttention (anchors.py) and the cuDNN-composed triangle (peers.py), in this process."""
    os.environ["SEQS"] = ",".join(map(str, seqs))
    sys.path.insert(0, peers_dir)  # torch.compile re-imports the module that defines the mask
    for name, call in (("peers", "composed"), ("anchors", "torch_anchors")):
        try:
            mod = importlib.import_module(name)
            getattr(mod, call)()
        except Exception as ex:
            traceback.print_exc()
            rows_out.append(dict(system=f"peer {name}.{call}", ms=None, note=repr(ex)[:400]))
            continue
        found = mod.rows if hasattr(mod, "rows") else mod.results["rows"]
        for r in found:
            if r.get("n") not in seqs:
                continue
            pattern = r.get("pattern", "triangle")
            row = dict(system=r["system"], pattern=pattern, n=r["n"], ms=r.get("ms"), note=r.get("note", ""))
            if r.get("rel_err") is not None:
                row["rel_err"] = r["rel_err"]
            rows_out.append(row)
            log(row)


def summarise(rows, seqs):
    """Markdown table: ms per system and length, and ratios to cuDNN dense and to the peers."""
    def ms_of(system, n, pattern=None):
        for r in rows:
            if r["system"] == system and r.get("n") == n and r.get("ms") and pattern in (None, r.get("pattern")):
                return r["ms"]
        return None

    systems = []
    for r in rows:
        key = (r["system"], r.get("pattern", ""))
        if key not in systems and r.get("n") in seqs:
            systems.append(key)
    lines = ["| system | pattern | " + " | ".join(f"{n // 1024}K ms" for n in seqs) + " | " +
             " | ".join(f"{n // 1024}K x cuDNN dense" for n in seqs) + " |",
             "|---|---|" + "---|" * (2 * len(seqs))]
    for system, pattern in systems:
        times = [ms_of(system, n, pattern) for n in seqs]
        speed = [(ms_of("jax cudnn", n) / t) if t and ms_of("jax cudnn", n) else None for n, t in zip(seqs, times)]
        lines.append(f"| {system} | {pattern} | " + " | ".join("-" if t is None else f"{t:.3f}" for t in times) + " | "
                     + " | ".join("-" if s is None else f"{s:.1f}" for s in speed) + " |")
    ours = [s for s, p in systems if s.startswith("tmjax mosaic_gpu bkv") and p == "triangle"]
    peers = ["torch flex_attention", "jax cudnn composed triangle", "flash-attn3-jax composed triangle"]
    lines += ["", "Best tmjax mosaic_gpu triangle vs peers (same run; < 1 means we are faster):", ""]
    for n in seqs:
        best = min((ms_of(s, n) for s in ours if ms_of(s, n)), default=None)
        parts = []
        for peer in peers:
            pm = ms_of(peer, n, "triangle")
            if best and pm:
                parts.append(f"{peer}: {pm:.3f} ms, ratio {best / pm:.2f}")
        lines.append(f"- {n // 1024}K: ours {'-' if best is None else f'{best:.3f} ms'}; " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="8192,32768,131072")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--peers", default=None, help="folder with peers.py and anchors.py")
    parser.add_argument("--dump-hlo", action="store_true", help="write the optimised HLO at the longest length")
    parser.add_argument("--heads", default=None, help="query heads, KV heads, head_dim (default 32,8,128)")
    parser.add_argument("--sweep", action="store_true", help="time mosaic_gpu over a grid of tunings")
    parser.add_argument("--write-tuning", default=None, help="write a mosaic_gpu tuning table from this run")
    parser.add_argument("--variants", default="", help="also time the table's mosaic_gpu tunings with these "
                        "field overrides, ';' between variants, e.g. 'items=2;items=4;guard=nonfinite'")
    args = parser.parse_args(argv)
    if args.heads:
        global HQ, HKV, D
        HQ, HKV, D = (int(x) for x in args.heads.split(","))
    seqs = [int(s) for s in args.seqs.split(",")]
    os.makedirs(args.out, exist_ok=True)
    log = lambda row: print("ROW", json.dumps(row), flush=True)  # noqa: E731
    rows: list[dict] = []
    if args.dump_hlo:
        dump_hlo(args.out, max(seqs))
    run_ours(seqs, rows, log, sweep=args.sweep, variants=parse_variants(args.variants))
    if args.peers:
        run_peers(args.peers, seqs, rows, log)
    device = jax.devices()[0].device_kind
    stamp = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=device, date=stamp.isoformat(timespec="seconds"), jax=jax.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv),
                shapes=dict(q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="bfloat16", batch=1,
                            n_init=N_INIT, n_local=N_LOCAL, n_last=N_LAST))
    base = os.path.join(args.out, f"attention-{device.replace(' ', '_')}-{stamp:%Y%m%d-%H%M}")
    with open(base + ".json", "w") as fh:
        json.dump(dict(meta, rows=rows), fh, indent=1)
    if args.write_tuning:
        write_tuning(args.write_tuning, rows, device)
    table = summarise(rows, seqs)
    with open(base + ".md", "w") as fh:
        fh.write(f"# Attention, one layer ({device}, {meta['date']}, jax {meta['jax']})\n\n")
        fh.write(f"Command: `{meta['command']}`. Shapes: {meta['shapes']}. Medians.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
