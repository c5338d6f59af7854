"""`tmjax convert` + `tmjax.load` on tiny transformers models saved locally (safetensors and GGUF).

Weights are checked by behaviour against the torch modules themselves (a torch Linear applied to a
random vector vs the same product with our kernel layout), not against our own mapping table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import tmjax
import tmjax.checkpoint as ckpt
from tmjax.convert import cli, writer

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
MODELS = {
    # untied, every bias on
    "llama_bias": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    # q/k/v biases, tied embeddings
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    # q/k norms, head_dim 16 so that q_proj is not square
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),
}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
    with torch.no_grad():  # far from HF's init so that a misplaced tensor cannot pass
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """kind -> (torch model, single-file folder, sharded bf16 folder)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in MODELS:
        model = tiny_model(kind)
        single, sharded = root / f"{kind}-single", root / f"{kind}-sharded"
        model.save_pretrained(single, safe_serialization=True)
        (single / "tokenizer_config.json").write_text('{"model_max_length": 128}')
        tiny_model(kind).to(torch.bfloat16).save_pretrained(sharded, safe_serialization=True, max_shard_size="8KB")
        out[kind] = (model, single, sharded)
    return out


def assert_matches_torch(params, model: torch.nn.Module, atol: float = 1e-5) -> None:
    """Every tensor of ``params`` (float32) acts like its torch module."""
    c, w = params.config, jax.tree.map(np.asarray, params.weights)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(c.hidden_size).astype(np.float32)
    xt = torch.from_numpy(x)

    def close(got, want):
        chex.assert_trees_all_close(got, want.detach().numpy().reshape(got.shape), atol=atol, rtol=1e-5)

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            att, mlp, ws = layer.self_attn, layer.mlp, w["layers"]["self_attn"]
            for name in ("q_proj", "k_proj", "v_proj"):
                got = np.einsum("h,hnd->nd", x, ws[name]["kernel"][i])
                if getattr(att, name).bias is not None:
                    got = got + ws[name]["bias"][i]
                close(got, getattr(att, name)(xt))
            a = rng.standard_normal((c.num_heads, c.head_dim)).astype(np.float32)
            got = np.einsum("nd,ndh->h", a, ws["o_proj"]["kernel"][i])
            if att.o_proj.bias is not None:
                got = got + ws["o_proj"]["bias"][i]
            close(got, att.o_proj(torch.from_numpy(a.reshape(-1))))
            u = rng.standard_normal(c.intermediate_size).astype(np.float32)
            for name, vec in (("gate_proj", x), ("up_proj", x), ("down_proj", u)):
                got = vec @ w["layers"]["mlp"][name]["kernel"][i]
                if getattr(mlp, name).bias is not None:
                    got = got + w["layers"]["mlp"][name]["bias"][i]
                close(got, getattr(mlp, name)(torch.from_numpy(vec)))
            close(w["layers"]["input_layernorm"]["scale"][i], layer.input_layernorm.weight)
            close(w["layers"]["post_attention_layernorm"]["scale"][i], layer.post_attention_layernorm.weight)
            if hasattr(att, "q_norm"):
                close(ws["q_norm"]["scale"][i], att.q_norm.weight)
                close(ws["k_norm"]["scale"][i], att.k_norm.weight)
        close(w["embed_tokens"]["embedding"], model.model.embed_tokens.weight)
        close(w["norm"]["scale"], model.model.norm.weight)
        head = w["embed_tokens"]["embedding"].T if c.tie_word_embeddings else w["lm_head"]["kernel"]
        close(x @ head, model.lm_head(xt))


def run(*argv) -> int:
    return cli.main([str(a) for a in argv] + ["--quiet"])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


@pytest.mark.parametrize("kind", list(MODELS))
def test_float32_matches_torch_and_bfloat16_rounds_it(models, kind, tmp_path):
    model, single, sharded = models[kind]
    assert run(single, tmp_path / "f32", "--dtype", "float32") == 0
    params = ckpt.load(tmp_path / "f32")
    assert jax.tree.leaves(params.weights)[0].dtype == np.float32
    assert_matches_torch(params, model)
    assert sorted(os.listdir(tmp_path / "f32")) == [
        "config.json", "generation_config.json", "tmjax.json", "tokenizer_config.json", "weights"]

    assert run(single, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    bf16 = ckpt.load(tmp_path / "bf16")
    assert {a.dtype for a in jax.tree.leaves(bf16.weights)} == {np.dtype(ml_dtypes.bfloat16)}
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params.weights)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, bf16.weights), rounded)
    upcast = ckpt.load(tmp_path / "bf16", dtype="float32")
    assert {a.dtype for a in jax.tree.leaves(upcast.weights)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("kind", list(MODELS))
def test_sharded_bfloat16_source(models, kind, tmp_path):
    model, _, sharded = models[kind]
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert run(sharded, tmp_path / "out", "--dtype", "float32") == 0
    # the source holds bf16 values: compare with the torch model rounded the same way
    rounded = tiny_model(kind).to(torch.bfloat16).to(torch.float32)
    assert_matches_torch(ckpt.load(tmp_path / "out"), rounded)


def test_force_overwrites_and_existing_dst_is_refused(models, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(models["qwen2"][1], dst) == 0
    capsys.readouterr()
    assert run(models["qwen3"][1], dst) == 1
    assert str(dst) in capsys.readouterr().err
    assert ckpt.load(dst).config.architecture == "qwen2"
    assert run(models["qwen3"][1], dst, "--force", "--dtype", "float32") == 0
    assert_matches_torch(ckpt.load(dst), models["qwen3"][0])
    assert leftovers(tmp_path) == []


def test_force_never_deletes_a_folder_that_is_not_a_checkpoint(models, tmp_path, capsys):
    dst = tmp_path / "precious"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    assert run(models["qwen2"][1], dst, "--force") == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "keep me"


def _state(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def _variant(src: Path, tmp_path: Path, tensors: dict | None = None, config_edit=None) -> Path:
    out = tmp_path / "src"
    shutil.copytree(src, out)
    if tensors is not None:
        save_file(tensors, out / "model.safetensors")
    if config_edit is not None:
        config = json.loads((out / "config.json").read_text())
        config_edit(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _bad_sources():
    """name -> (builder(src, tmp_path) -> folder, text the error must contain)."""
    k_name = "model.layers.1.self_attn.k_proj.weight"

    def drop(src, tmp):
        state = _state(src)
        del state[k_name]
        return _variant(src, tmp, state)

    def extra(src, tmp):
        return _variant(src, tmp, {**_state(src), "model.layers.0.self_attn.rogue.weight": np.zeros(3, np.float32)})

    def misshape(src, tmp):
        state = _state(src)
        state[k_name] = state[k_name][:-1]
        return _variant(src, tmp, state)

    def truncated(src, tmp):
        out = _variant(src, tmp)
        _truncate(out)
        return out

    def corrupt(src, tmp):
        out = _variant(src, tmp)
        (out / "model.safetensors").write_bytes(b"\xff" * 64)
        return out

    def architecture(src, tmp):
        return _variant(src, tmp, config_edit=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))

    def rope(src, tmp):
        return _variant(src, tmp, config_edit=lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))

    def no_weights(src, tmp):
        out = _variant(src, tmp)
        (out / "model.safetensors").unlink()
        return out

    return {
        "missing": (drop, k_name),
        "unexpected": (extra, "model.layers.0.self_attn.rogue.weight"),
        "misshaped": (misshape, k_name),
        "truncated": (truncated, "model.safetensors"),
        "corrupt": (corrupt, "model.safetensors"),
        "architecture": (architecture, "gpt2"),
        "rope": (rope, "longrope"),
        "no_weights": (no_weights, "model.safetensors"),
    }


@pytest.mark.parametrize("case", list(_bad_sources()))
def test_bad_source_fails_cleanly(models, tmp_path, capsys, case):
    build, needle = _bad_sources()[case]
    src = build(models["qwen2"][1], tmp_path)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    assert run(src, out_parent / "dst") == 1
    err = capsys.readouterr().err
    assert "error" in err and needle in err, err
    assert os.listdir(out_parent) == []


def test_sharded_index_naming_a_missing_shard(models, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(models["qwen2"][2], src)
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert run(src, tmp_path / "dst") == 1
    assert victim.name in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_missing_source_and_bad_dtype(tmp_path, capsys):
    assert run(tmp_path / "nope", tmp_path / "dst") == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert run(tmp_path, tmp_path / "dst", "--dtype", "float16") == 2  # argparse usage error
    assert not (tmp_path / "dst").exists()


def test_failure_while_writing_leaves_nothing(models, tmp_path, monkeypatch):
    def boom(folder, weights):
        (folder / "weights").mkdir()
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer, "save_weights", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(models["qwen2"][1], tmp_path / "dst")
    assert os.listdir(tmp_path) == []


def test_interrupt_mid_stream_leaves_nothing_and_keeps_old_checkpoint(models, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    assert run(models["qwen2"][1], dst) == 0
    from tmjax.convert.safetensors_source import SafetensorsSource

    calls = []
    real = SafetensorsSource.get_tensor

    def interrupted(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(SafetensorsSource, "get_tensor", interrupted)
    assert run(models["qwen3"][1], dst, "--force") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    assert ckpt.load(dst).config.architecture == "qwen2"


def test_sigterm_mid_conversion_leaves_nothing_loadable(tmp_path):
    """A real process stopped by SIGTERM while it writes: no checkpoint, no staging folder."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    big = dict(SMALL, hidden_size=512, intermediate_size=2048, vocab_size=8192, num_hidden_layers=4)
    LlamaForCausalLM(LlamaConfig(**big)).save_pretrained(src)  # ~80 MB: long enough to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "tmjax.cli", "convert", str(src), str(dst), "--quiet"],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not leftovers(tmp_path):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:  # it finished before the signal landed: then it must be complete
        ckpt.load(dst)
    else:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_stale_staging_folder_of_a_killed_run_is_removed(models, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".dst.partial-{dead.pid}-abc"
    (stale / "weights").mkdir(parents=True)
    assert run(models["qwen2"][1], tmp_path / "dst") == 0
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_load_refuses_incomplete_checkpoints(models, tmp_path):
    good = tmp_path / "good"
    assert run(models["qwen2"][1], good) == 0
    with pytest.raises(ValueError, match="no such directory"):
        ckpt.load(tmp_path / "absent")

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    cases = {
        "tmjax.json is missing": lambda f: (f / "tmjax.json").unlink(),
        "not valid JSON": lambda f: (f / "tmjax.json").write_text('{"format": '),
        "format version": lambda f: (f / "tmjax.json").write_text(
            json.dumps({**json.loads((good / "tmjax.json").read_text()), "version": 99})),
        "missing or incomplete": lambda f: (f / "weights" / "_CHECKPOINT_METADATA").unlink(),
        "config.json is missing": lambda f: (f / "config.json").unlink(),
    }
    for i, (message, edit) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            ckpt.load(broken(f"b{i}", edit))
    def mismatch(f):  # a config edited consistently with the manifest: the stored shapes disagree
        (f / "config.json").write_text(
            json.dumps({**json.loads((good / "config.json").read_text()), "intermediate_size": 40}))
        meta = json.loads((f / "tmjax.json").read_text())
        (f / "tmjax.json").write_text(json.dumps({**meta, "files": ckpt.build_manifest(f)}))

    expected = r"cannot restore .*'layers/mlp/down_proj/kernel' has shape \(2, 48, 32\) but config.json implies \(2, 40, 32\)"
    with pytest.raises(ValueError, match=expected):
        ckpt.load(broken("shape", mismatch))


def test_tokenizer_helper_reads_the_copied_files(tmp_path):
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers

    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(src)
    tok = Tokenizer(tk_models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert run(src, tmp_path / "dst") == 0
    assert ckpt.tokenizer(tmp_path / "dst")("hello world")["input_ids"] == [1, 2]


# --- GGUF: a tiny llama written like llama.cpp does (q/k rows permuted for interleaved RoPE) ---

_GGUF = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (half-split -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model: torch.nn.Module, path: Path, arch: str = "llama", edit=None,
                    vocab_size: bool = True) -> None:
    """``edit(gguf_name, array)`` may replace a tensor before it is written, or drop it (None);
    ``vocab_size=False`` leaves out that metadata key (llama.cpp often does)."""
    c = model.config
    out = gguf.GGUFWriter(str(path), arch)
    out.add_block_count(c.num_hidden_layers)
    out.add_context_length(c.max_position_embeddings)
    out.add_embedding_length(c.hidden_size)
    out.add_feed_forward_length(c.intermediate_size)
    out.add_head_count(c.num_attention_heads)
    out.add_head_count_kv(c.num_key_value_heads)
    out.add_rope_freq_base(50000.0)
    out.add_layer_norm_rms_eps(c.rms_norm_eps)
    if vocab_size:
        out.add_vocab_size(c.vocab_size)
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{_GGUF['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            gname = f"{_GGUF[parts[0]]}.{parts[-1]}"
        if "q_proj" in name:
            w = _llama_cpp_permute(w, c.num_attention_heads)
        if "k_proj" in name:
            w = _llama_cpp_permute(w, c.num_key_value_heads)
        w = w.astype(np.float16) if "mlp" in name else w
        if edit is not None:
            w = edit(gname, w)
        if w is not None:
            out.add_tensor(gname, w)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def test_gguf_llama_unpermuted_and_config_rebuilt(tmp_path):
    model = tiny_model("llama_bias")
    with torch.no_grad():  # the GGUF stores the MLP in float16: round the reference the same way
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.copy_(p.half().float())
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    assert run(tmp_path / "tiny.gguf", tmp_path / "dst", "--dtype", "float32") == 0
    params = ckpt.load(tmp_path / "dst")
    assert_matches_torch(params, model)
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    want = model.config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "attention_bias",
                "mlp_bias", "tie_word_embeddings", "model_type"):
        assert config[key] == want[key], key
    assert config["rope_parameters"]["rope_theta"] == 50000.0
    assert json.loads((tmp_path / "dst" / "tmjax.json").read_text())["source_format"] == "gguf"


def test_gguf_unsupported_architecture(tmp_path, capsys):
    write_tiny_gguf(tiny_model("llama_bias"), tmp_path / "tiny.gguf", arch="gpt2")
    assert run(tmp_path / "tiny.gguf", tmp_path / "dst") == 1
    assert "'gpt2'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


def test_console_script_exit_code(models, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "x").write_text("")
    exe = Path(sys.executable).parent / "tmjax"
    proc = subprocess.run([str(exe), "convert", str(models["qwen2"][1]), str(dst)],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert str(dst) in proc.stderr


def test_tied_config_with_a_distinct_lm_head_keeps_the_head_like_transformers(models, tmp_path):
    """config.json says tie_word_embeddings but the folder holds its own lm_head.weight: transformers 5
    keeps that head (untied), so the conversion must too, and say so; logits against transformers'."""
    model = tiny_model("llama_bias")
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True)
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "convert", str(src), str(tmp_path / "dst"), "--quiet",
                           "--dtype", "float32"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "lm_head.weight differs from the embedding: keeping it (untied)" in proc.stderr
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()  # transformers untied it
    params = ckpt.load(tmp_path / "dst")
    assert not params.config.tie_word_embeddings
    assert_matches_torch(params, hf)
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=12).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.as_tensor(ids[None].astype(np.int64))).logits[0, -1].numpy()
    got = np.asarray(tmjax.prefill(params, ids, None)[0])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_tied_config_with_an_equal_lm_head_stays_tied(models, tmp_path):
    """A saved copy of the tied head (equal to the embedding) is the harmless duplicate: still tied."""
    _, single, _ = models["qwen2"]
    tensors = _state(single)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    assert run(_variant(single, tmp_path, tensors), tmp_path / "dst", "--dtype", "float32") == 0
    assert ckpt.load(tmp_path / "dst").config.tie_word_embeddings
