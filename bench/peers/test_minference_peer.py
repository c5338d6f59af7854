"""CPU checks of the MInference peer (issue 22): argument handling, the clean failure without a GPU, their
patched model against transformers' own on a tiny Llama, and the comparison table from made-up timings.

Run: JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -p no:cacheprovider bench/peers/test_minference_peer.py
Tests that import their code need the export in .carry/minference (see bench/minference_gpu.sh) and skip
without it. Their code runs in subprocesses: the CPU stand-ins for Triton must not leak into other tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE = ROOT / ".carry" / "minference"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import minference_table  # noqa: E402

needs_source = pytest.mark.skipif(not (SOURCE / "minference" / "modules" / "tri_mix.py").is_file(),
                                  reason="no MInference export in .carry/minference")


def _fake_source(tmp_path: Path) -> Path:
    for part in ("minference/__init__.py", "minference/modules/tri_mix.py", "csrc/kernels.cpp",
                 "csrc/vertical_slash_index.cu"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("")
    return tmp_path


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""})


def test_source_folder_without_their_files_is_refused(tmp_path):
    import minference_source

    with pytest.raises(SystemExit, match="no minference/__init__.py"):
        minference_source.check_folder(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "32k"], "--lengths must be comma-separated integers"),
    (["--lengths", "512"], "--lengths must each be >= 1024"),
    (["--configs", "dense,minference"], "unknown ['minference']"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--switch-layer", "33"], "--switch-layer must be in [0, 32]"),
])
def test_ttft_arguments_are_checked(tmp_path, capsys, argv, message):
    import minference_ttft

    with pytest.raises(SystemExit):
        minference_ttft.parse_args([str(_fake_source(tmp_path)), *argv])
    assert message in capsys.readouterr().err


def test_ttft_arguments_parse(tmp_path):
    import minference_ttft

    args = minference_ttft.parse_args([str(_fake_source(tmp_path)), "--lengths", "131072,32768",
                                       "--configs", "tri_mix,dense", "--repeats", "5"])
    assert args.lengths == [131072, 32768] and args.configs == ["tri_mix", "dense"]
    assert (args.repeats, args.switch_layer) == (5, 16)


def test_agree_refuses_a_length_without_a_middle(tmp_path, capsys):
    import minference_agree

    with pytest.raises(SystemExit):
        minference_agree.parse_args([str(_fake_source(tmp_path)), "--length", "1000"])
    assert "--length must be >= 1280" in capsys.readouterr().err


def test_their_configurations_are_what_their_speed_test_passes():
    import minference_ttft

    tri = minference_ttft.minference_kwargs("tri_mix", 16)
    assert tri["attn_type"] == "tri_mix" and tri["attn_kwargs"] == {"starting_layer": 16, "n_init": 8, "n_local": 512,
                                                                    "n_last": 128}
    assert minference_ttft.minference_kwargs("dense", 16) == {"attn_type": "dense",
                                                              "model_name": "meta-llama/Llama-3.1-8B-Instruct"}


def test_ttft_without_a_gpu_says_so(tmp_path):
    done = _run("import sys; sys.path.insert(0, 'bench/peers'); import minference_ttft; minference_ttft.main()",
                str(_fake_source(tmp_path)))
    assert done.returncode == 1 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]


@needs_source
def test_importing_their_code_without_cuda_fails_in_one_line():
    code = ("import sys; sys.path.insert(0, 'bench/peers'); import minference_source as s\n"
            "try:\n    s.load(s.check_folder(sys.argv[1]), None, 'no GPU')\n"
            "except RuntimeError as ex:\n    print('ERROR', ex)\nelse:\n    print('LOADED')\n")
    done = _run(code, str(SOURCE))
    lines = [x for x in done.stdout.splitlines() if x.startswith(("ERROR", "LOADED"))]
    assert len(lines) == 1 and lines[0].startswith(f"ERROR importing minference from {SOURCE} failed: "), done.stdout


# Their modules import Triton and create a CUDA tensor at import time; on this CPU machine a permissive
# stand-in for Triton and a cuda->cpu torch.arange let the import finish, so the patched model's dense
# path (the one that does not need Triton) can be compared with transformers' own model.
_PATCHED_VS_HF = r"""
import json, sys, types
import torch
import transformers.generation, transformers.models.llama.modeling_llama  # before the Triton stand-in
import transformers.models.glm.modeling_glm, transformers.models.qwen2.modeling_qwen2
sys.path[:0] = ['bench/peers', 'bench']

class Anything:
    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else Anything()
    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return Anything()

class AnyModule(types.ModuleType):
    __getattr__ = Anything.__getattr__

if 'triton' not in sys.modules:
    sys.modules['triton'], sys.modules['triton.language'] = AnyModule('triton'), AnyModule('triton.language')
arange = torch.arange
torch.arange = lambda *a, device=None, **k: arange(*a, device='cpu' if device == 'cuda' else device, **k)
import minference_source as s, minference_ttft as t
package = s.load(s.check_folder(sys.argv[1]), None, 'CPU test')
torch.arange = arange
s.install_dense_kernel(package, 'math')
calls = {'dense': 0}
for module, name in (('minference.modules.tri_mix', 'flash_attn_func'),
                     ('minference.modules.forward', '_flash_attention_forward')):
    module = sys.modules[module]
    def spy(*a, _f=getattr(module, name), **k):
        calls['dense'] += 1
        return _f(*a, **k)
    setattr(module, name, spy)
layers = 3
shape = dict(t.LLAMA_31_8B, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=101)
config = t.llama_config(shape)
ids = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(1))
want = t.prefill(t.build_model(config, 'cpu', torch.float32), ids)
out = {'patches': s.PATCHES, 'layers': layers}
for name, switch in (('dense', 16), ('tri_mix', layers)):
    model = package.MInference(**t.minference_kwargs(name, switch))(t.build_model(config, 'cpu', torch.float32))
    calls['dense'] = 0
    got = t.prefill(model, ids)
    out[name] = {'max_abs_diff': float((got - want).abs().max()), 'scale': float(want.abs().max()),
                 'shape': list(got.shape), 'dense_calls': calls['dense']}
print('RESULT', json.dumps(out))
"""


@needs_source
def test_their_patched_model_matches_transformers_on_the_dense_path():
    done = _run(_PATCHED_VS_HF, str(SOURCE))
    result = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert result, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(result[0][7:])
    for name in ("dense", "tri_mix"):
        r = result[name]
        assert r["shape"] == [1, 1, 101], name  # logits_to_keep=1
        assert r["dense_calls"] == result["layers"], f"{name}: their layers did not all run the SDPA stand-in"
        assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["scale"]), f"{name}: {r}"
    assert any("forward_llama_decoder_layer" in p for p in result["patches"])


def _our_names() -> dict:
    """Config -> system name exactly as bench/ttft.py writes it for the driver's flags."""
    import ttft

    args = argparse.Namespace(switch_layer=16, vertical=512, slash=2048, selection="head", configs="dense,tm,tm+vs")
    return dict(zip(("dense", "tm", "tm+vs"), (f"tmjax {n}" for n in ttft.layouts(args))))


def test_table_pairs_rows_and_divides_ours_by_theirs(tmp_path):
    names = _our_names()
    ours_s = {("dense", 32768): 1.2, ("tm", 32768): 0.9, ("tm+vs", 32768): 1.0, ("dense", 131072): 11.0,
              ("tm", 131072): 7.0, ("tm+vs", 131072): None}
    theirs_s = {("dense", 32768): 1.5, ("tri_mix", 32768): 1.1, ("tri_mix_minference", 32768): 1.3,
                ("dense", 131072): 11.5, ("tri_mix", 131072): 8.0}
    ours = [{"system": names[c], "n": n, "median_s": s, **({"error": "boom"} if s is None else {})}
            for (c, n), s in ours_s.items()]
    theirs = [{"system": f"MInference {c}", "config": c, "n": n, "median_s": s} for (c, n), s in theirs_s.items()]
    (tmp_path / "ours.json").write_text(json.dumps({"meta": {"jax": "x"}, "rows": ours}))
    # theirs only as a log cut short: ROW lines among other output, the last one half-written
    log = ["starting"] + [f"ROW {json.dumps(r)}" for r in theirs] + ['ROW {"system": "MInf']
    (tmp_path / "theirs.log").write_text("\n".join(log))
    minference_table.main(["--ours", str(tmp_path / "ours.json"), "--theirs", str(tmp_path / "missing.json"),
                           str(tmp_path / "theirs.log"), "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "minference-vs-tmjax.json").read_text())
    got = {(r["n"], r["config"]): r for r in record["rows"]}
    assert len(got) == 6
    for (label, mine, their), n in [(p, n) for p in minference_table.PAIRS for n in (32768, 131072)]:
        row = got[(n, label)]
        a, b = ours_s.get((mine, n)), theirs_s.get((their, n))
        assert row["ours_s"] == a and row["theirs_s"] == b
        assert row["ours_over_theirs"] == (pytest.approx(a / b) if a and b else None)
        assert row["ours_vs_own_dense"] == (pytest.approx(a / ours_s[("dense", n)]) if a and mine != "dense" else None)
        assert row["theirs_vs_own_dense"] == (pytest.approx(b / theirs_s[("dense", n)]) if b and their != "dense"
                                              else None)
    md = (tmp_path / "out" / "minference-vs-tmjax.md").read_text()
    assert f"| 32768 | TriangleMix | 0.900 | 1.100 | {0.9 / 1.1:.2f}x |" in md
    assert "| 131072 | TriangleMix + vertical-slash | failed | - |" in md
    assert "- 131072 TriangleMix + vertical-slash (ours): boom" in md
    assert "One-layer check: no result" in md


def test_table_reports_their_failure_before_timing(tmp_path):
    (tmp_path / "theirs.json").write_text(json.dumps({"meta": {"error": "importing minference failed: X"}, "rows": []}))
    (tmp_path / "theirs.log").write_text("Traceback ...\n")
    minference_table.main(["--theirs", str(tmp_path / "theirs.json"), str(tmp_path / "theirs.log"),
                           "--out", str(tmp_path)])
    md = (tmp_path / "minference-vs-tmjax.md").read_text()
    assert "Their code did not get to timing: importing minference failed: X" in md
