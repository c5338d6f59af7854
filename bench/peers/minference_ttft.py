"""TTFT of the authors' TriangleMix (MInference tri_mix, tri_mix_minference, dense) on a Llama-3.1-8B-shaped model.

microsoft/MInference's three attention types patch a Hugging Face LlamaForCausalLM with Llama-3.1-8B's
shapes and random weights (bf16, built on the GPU).

The MInference source is an export kept outside this repository (first argument; its ``COMMIT`` file
names the commit, recorded with every run). What runs is their own code path, as their
``TriangleMix/speed_test.py`` sets it up (``MInference(attn_type=..., model_name=...)(model)``, then
``model(input_ids, use_cache=False)``), with the run-time patches that ``minference_source`` lists in the
output, plus ``logits_to_keep=1`` (last-position logits, as our TTFT returns). The dense layers of all
three run torch SDPA with the faster of its cuDNN and flash backends on this GPU (probed first; flash_attn
is not installed), so dense, tri_mix and tri_mix_minference share one dense kernel. One warm-up per
length and configuration (Triton autotuning), then the median of ``--repeats`` timed calls, each between
``torch.cuda.synchronize()``. Rows go to ``--out``/minference-ttft.json after every row.

    python3 bench/peers/minference_ttft.py .carry/minference --lengths 32768,65536,131072 --out "$OUT"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minference_source  # noqa: E402
from minference_table import write_json  # noqa: E402
from ttft import LLAMA_31_8B  # noqa: E402

# Their model name selects their Llama-3.1-8B pattern file (configs/..._best_pattern_v2.json: every head
# of every layer vertical-and-slash with 512 verticals and 2048 slashes).
MODEL_NAME = "meta-llama/Llama-3.1-8B-Instruct"
TRIANGLE = {"n_init": 8, "n_local": 512, "n_last": 128}
CONFIGS = ("dense", "tri_mix", "tri_mix_minference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with the MInference export (minference/, csrc/, COMMIT)")
    parser.add_argument("--lengths", default="32768,65536,131072", help="comma-separated prompt lengths")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median reported)")
    parser.add_argument("--switch-layer", type=int, default=16, help="their starting_layer")
    parser.add_argument("--sdpa", default="auto", choices=("auto", "cudnn", "flash"),
                        help="dense kernel: torch SDPA backend (auto: the faster in a probe)")
    parser.add_argument("--extension-dir", default=None, help="torch JIT build folder for their CUDA extension")
    parser.add_argument("--extension-failed", default=None, metavar="REASON",
                        help="an earlier build of their extension failed for REASON: do not build again")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if any(n < 1024 for n in args.lengths):
        parser.error(f"--lengths must each be >= 1024 (the triangle's window and last rows), got {args.lengths}")
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 <= args.switch_layer <= LLAMA_31_8B["num_hidden_layers"]:
        parser.error(f"--switch-layer must be in [0, {LLAMA_31_8B['num_hidden_layers']}], got {args.switch_layer}")
    args.source = minference_source.check_folder(args.source)
    return args


def llama_config(shape: dict):
    """transformers 5.x LlamaConfig from an HF config.json-style dict (``rope_scaling`` + ``rope_theta``
    become 5.x's ``rope_parameters``)."""
    from transformers import LlamaConfig

    keep = {k: v for k, v in shape.items() if k not in ("architectures", "model_type", "rope_scaling", "rope_theta")}
    rope = dict(shape.get("rope_scaling") or {"rope_type": "default"}, rope_theta=shape["rope_theta"])
    config = LlamaConfig(**keep, rope_parameters=rope)
    config._attn_implementation = "sdpa"  # the causal mask is then skipped (None) for unpadded prompts
    return config


def build_model(config, device: str, dtype, seed: int = 0):
    """Random-weight LlamaForCausalLM built directly on ``device`` in ``dtype`` (no CPU copy)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def minference_kwargs(config: str, switch_layer: int) -> dict:
    """Their MInference(...) arguments for one configuration, as their speed_test.py passes them."""
    if config == "dense":
        return {"attn_type": "dense", "model_name": MODEL_NAME}
    return {"attn_type": config, "model_name": MODEL_NAME,
            "attn_kwargs": {"starting_layer": switch_layer, **TRIANGLE}}


def prefill(model, ids):
    """One TTFT call: last-position logits, no cache."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def time_row(model, ids, repeats: int) -> dict:
    import torch

    def once():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = prefill(model, ids)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, logits

    first, _ = once()
    times = []
    for _ in range(repeats):
        dt, logits = once()
        times.append(dt)
    return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first,
            "finite": bool(torch.isfinite(logits).all())}


def probe_sdpa(choice: str, length: int = 32768) -> tuple[str, dict]:
    """(backend, {backend: ms}): one causal layer at Llama-3.1-8B heads timed with each backend
    (K/V already repeated to 32 heads, as their pipeline passes them)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    timings = {}
    for name in (("cudnn", "flash") if choice == "auto" else (choice,)):
        attend = minference_source.sdpa_causal(name)
        try:
            attend(q, k, v, True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                attend(q, k, v, True)
            torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - t0) / 3 * 1e3
        except RuntimeError as ex:  # a backend that refuses these shapes
            timings[name] = f"unavailable: {str(ex).splitlines()[0][:200]}"
    usable = {n: t for n, t in timings.items() if isinstance(t, float)}
    if not usable:
        raise RuntimeError(f"no SDPA backend ran causal bf16 at {length} tokens: {timings}")
    return min(usable, key=usable.get), timings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("minference_ttft: needs a CUDA GPU (their kernels are Triton and CUDA)")
    out = Path(args.out) / "minference-ttft.json"
    meta = {"what": "the authors' TriangleMix (MInference) TTFT, Llama-3.1-8B shapes, RANDOM weights (bf16)",
            "source": minference_source.provenance(args.source), "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "call": "model(input_ids=ids, use_cache=False, logits_to_keep=1) under torch.no_grad()",
            "switch_layer": args.switch_layer, "triangle": TRIANGLE, "model_name_for_patterns": MODEL_NAME,
            "repeats": args.repeats, "command": "python3 " + " ".join(sys.argv)}
    t0 = time.perf_counter()
    extension, extension_error = None, args.extension_failed
    if extension_error is None:
        try:
            extension = minference_source.build_extension(args.source, args.extension_dir)
        except Exception as ex:  # keep tri_mix and dense: only tri_mix_minference needs it
            extension_error = f"{type(ex).__name__}: {str(ex)[-600:]}"
    if extension_error:
        print("EXTENSION BUILD FAILED:", extension_error, flush=True)
    meta["extension"] = {"built": extension is not None, "seconds": time.perf_counter() - t0, "error": extension_error}
    try:
        package = minference_source.load(args.source, extension, extension_error)
        backend, probe = probe_sdpa(args.sdpa)
    except RuntimeError as ex:  # nothing to time: leave the reason in the record
        meta.update(error=str(ex), patches=minference_source.PATCHES)
        write_json(out, {"meta": meta, "rows": []})
        raise SystemExit(f"minference_ttft: {ex}")
    minference_source.install_dense_kernel(package, backend)
    import transformers
    import triton

    ops = sys.modules["minference.ops.pit_sparse_flash_attention_v2"]
    meta.update(transformers=transformers.__version__, triton=triton.__version__,
                dense_kernel={"sdpa_backend": backend, "probe_ms_one_layer_32k": probe},
                sparse_kernels="Triton (sgl_kernel/vllm sparse kernels absent)" if ops.sparse_attn_func is None
                else "sgl_kernel/vllm", patches=minference_source.PATCHES)
    print(json.dumps(meta, indent=1), flush=True)

    t0 = time.perf_counter()
    model = build_model(llama_config(LLAMA_31_8B), "cuda", torch.bfloat16)
    meta["model_build_s"] = time.perf_counter() - t0
    rows: list[dict] = []
    for n in args.lengths:
        ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (1, n), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(n))
        for config in args.configs:
            row = {"system": f"MInference {config}", "config": config, "n": n}
            torch.cuda.reset_peak_memory_stats()
            try:
                model = package.MInference(**minference_kwargs(config, args.switch_layer))(model)
                row.update(time_row(model, ids, args.repeats))
            except Exception as ex:  # keep the other rows: report what failed
                traceback.print_exc()
                row.update(median_s=None, error=f"{type(ex).__name__}: {str(ex)[:400]}")
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            print("ROW", json.dumps(row), flush=True)
            write_json(out, {"meta": meta, "rows": rows})
            torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
