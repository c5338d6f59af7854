"""The demo's haystack prompt (the pass key appears once, at the requested depth, near the target length)
and a whole ``tmjax demo`` run on a tiny model."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_evaluate import tiny_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import tmjax
from tmjax import checkpoint, default_model, demo
from tmjax.demo import FILLER, build_prompt


@pytest.fixture(scope="module")
def tokenizer():
    words = sorted(set((FILLER + " pass key is Remember it. There a hidden inside lot of irrelevant text Find and "
                        "memorize What the Answer with number only ?").replace(".", " . ").split()))
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return tok


@pytest.mark.parametrize("target, depth", [(300, 0.0), (2000, 0.4), (2000, 1.0)])
def test_prompt_hides_one_key_at_the_depth(tokenizer, target, depth):
    text, key = build_prompt(tokenizer, target, depth, seed=target)
    assert len(key) == 5 and key.isdigit()
    fact = f"The pass key is {key}."
    assert text.count(fact) == 1
    haystack_start = text.index("memorize it.") + len("memorize it.")
    haystack_end = text.index("What is the pass key?")
    position = (text.index(fact) - haystack_start) / (haystack_end - haystack_start)
    assert abs(position - depth) < 0.1
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    assert 0.8 * target <= n_tokens <= 1.05 * target


def test_seed_picks_the_key(tokenizer):
    keys = {build_prompt(tokenizer, 300, 0.5, seed=s)[1] for s in range(5)}
    assert len(keys) > 1
    assert build_prompt(tokenizer, 300, 0.5, seed=3) == build_prompt(tokenizer, 300, 0.5, seed=3)


def test_demo_runs_dense_and_the_requested_trianglemix(tmp_path, monkeypatch, capsys):
    """``tmjax demo`` on a tiny random model standing in for SmolLM2: its two answers are the greedy
    continuations that ``tmjax.generate`` gives dense and with the requested TriangleMix layout, which
    differ here (every layer a triangle with a 32-token window on a ~300-token prompt)."""
    folder = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(default_model, "smollm2_checkpoint", lambda dtype="float32": folder)
    args = ["--prompt-tokens", "300", "--depth", "0.5", "--switch-layer", "0", "--n-init", "4", "--n-local", "32",
            "--n-last", "16", "--max-new-tokens", "6", "--seed", "3"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out

    params, tok = tmjax.load(folder), checkpoint.tokenizer(folder)
    text, _ = build_prompt(tok, 300, 0.5, seed=3)
    tokens = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
    layout = tmjax.TriangleMix(0, n_init=4, n_local=32, n_last=16)
    answers = {name: np.asarray(tmjax.generate(params, tokens, 6, lay)).tolist()
               for name, lay in (("dense", None), ("TriangleMix", layout))}
    assert answers["dense"] != answers["TriangleMix"]  # the layout changes this model's answer
    for name, ids in answers.items():
        assert f"{name:>12}: answer {tok.decode(ids, skip_special_tokens=True).strip()!r}" in out, out
    assert "TriangleMix answer identical to dense: False" in out
    # the warm prefill medians and their ratio, from the per-run lines above
    times = {name: float(re.search(rf"{name:>12}: .* prefill ([0-9.]+) s", out).group(1))
             for name in ("dense", "TriangleMix")}
    line = re.search(r"warm prefill \(median of 3 runs after compiling\): dense ([0-9.]+) s, TriangleMix ([0-9.]+) s; "
                     r"TriangleMix / dense = ([0-9.]+) \(speed-up ([0-9.]+)x\)", out)
    assert line, out
    dense_s, tm_s, ratio, speedup = map(float, line.groups())
    assert abs(dense_s - times["dense"]) <= 0.006 and abs(tm_s - times["TriangleMix"]) <= 0.006
    half = 0.0005  # the printed times' rounding; the ratios are printed to 0.005
    assert (tm_s - half) / (dense_s + half) - 0.005 <= ratio <= (tm_s + half) / (dense_s - half) + 0.005
    assert (dense_s - half) / (tm_s + half) - 0.005 <= speedup <= (dense_s + half) / (tm_s - half) + 0.005


def test_a_prompt_beyond_the_models_positions_is_refused_before_model_work():
    """--prompt-tokens (with the answer's --max-new-tokens) past SmolLM2's positions: one line naming the
    argument and the limit, at once (it used to build the prompt and run until the OOM killer came)."""
    from tmjax.convert.gguf_source import GGUFSource

    with GGUFSource(default_model.smollm2_gguf()) as source:  # the model's own file, not our reading of it
        positions = int(source.hf_config["max_position_embeddings"])
    for argv in (["--prompt-tokens", "100000000"], ["--prompt-tokens", str(positions - 10), "--max-new-tokens", "11"]):
        proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "demo", *argv], capture_output=True, text=True,
                              timeout=90, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tmjax demo: error: --prompt-tokens")
        assert f"at most the model's {positions} positions" in proc.stderr
