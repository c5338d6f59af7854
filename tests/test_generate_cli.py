"""``tmjax generate`` end to end: on a tiny converted model with a word-level tokenizer (one prompt
streamed, TriangleMix, a JSONL of mixed lengths, --chat, an interrupted JSONL run, bad input) and on
the real SmolLM2-135M-Instruct. Greedy text is checked against transformers' own ``generate`` on the
same saved model, each prompt alone; TriangleMix (which transformers lacks) against ``tmjax.generate``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_fixtures
import tmjax
from tmjax import checkpoint
from tmjax.convert.cli import main as convert_main
from tmjax.generate_cli import OUTPUT_KEYS
from tmjax.generate_cli import main as generate_main

EOS = 1
WORDS = ["<unk>", "</s>"] + [f"w{i}" for i in range(2, 256)]
CHAT_TEMPLATE = "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}{% if add_generation_prompt %}w7{% endif %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(the transformers folder, its tmjax checkpoint): a 3-layer Llama whose token i is the word ``WORDS[i]``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    src = hf_fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", "llama", num_hidden_layers=3,
                                      eos_token_id=EOS)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE}))
    dst = src.parent / "ckpt"
    assert convert_main([str(src), str(dst), "--dtype", "float32", "--quiet"]) == 0
    return src, dst


def _words(seed: int, n: int) -> str:
    return " ".join(WORDS[i] for i in np.random.default_rng(seed).integers(2, 256, size=n))


def _hf_greedy(src: Path, ids: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of one prompt, up to and including EOS."""
    model = hf_fixtures.load_hf(src)
    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=EOS,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


def _text(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids if i != EOS)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = generate_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_prompt_streams_the_greedy_text(tiny, capsys):
    src, ckpt = tiny
    prompt = _words(0, 20)
    code, out, err = _run([ckpt, "--prompt", prompt, "--max-new-tokens", 12, "--quiet"], capsys)
    assert code == 0, err
    ids = checkpoint.tokenizer(ckpt)(prompt)["input_ids"]
    assert out == _text(_hf_greedy(src, ids, 12)) + "\n"
    assert "20 prompt tokens" in err and "prefill" in err and "decode" in err


def test_trianglemix_and_a_prompt_file(tiny, capsys, tmp_path):
    _, ckpt = tiny
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(_words(1, 40))
    code, out, err = _run([ckpt, "--prompt-file", prompt_file, "--switch-layer", 1, "--n-init", 2, "--n-local", 4,
                           "--n-last", 3, "--max-new-tokens", 8], capsys)
    assert code == 0, err
    ids = checkpoint.tokenizer(ckpt)(prompt_file.read_text())["input_ids"]
    layout = tmjax.TriangleMix(1, n_init=2, n_local=4, n_last=3)
    expected = np.asarray(tmjax.generate(tmjax.load(ckpt), ids, 8, layout, eos_token_id=EOS)).tolist()
    assert out == _text(expected[:expected.index(EOS) + 1] if EOS in expected else expected) + "\n"
    dense = _run([ckpt, "--prompt-file", prompt_file, "--max-new-tokens", 8], capsys)[1]
    assert dense != out  # the triangle changed the answer: the option reached the model


def test_jsonl_of_mixed_lengths(tiny, capsys, tmp_path):
    src, ckpt = tiny
    lengths = [5, 30, 140, 12, 200, 31]  # buckets 128, 128, 256, 128, 256, 128
    lines = [json.dumps({"prompt": _words(10 + i, n), "id": f"p{i}"}) for i, n in enumerate(lengths)]
    lines.insert(2, "")  # blank lines are skipped; line numbers stay those of the file
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    code, stdout, err = _run([ckpt, "--jsonl", source, "--out", out, "--max-new-tokens", 6, "--batch-size", 3],
                             capsys)
    assert code == 0, err
    assert stdout == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [f"p{i}" for i in range(len(lengths))]
    tokenizer = checkpoint.tokenizer(ckpt)
    for record in records:
        i = int(record["id"][1:])
        assert record["line"] == i + 1 + (i >= 2)
        ids = tokenizer(_words(10 + i, lengths[i]))["input_ids"]
        expected = _hf_greedy(src, ids, 6)
        assert record["text"] == _text(expected), record
        assert (record["prompt_tokens"], record["new_tokens"]) == (lengths[i], len(expected))
        assert record["finish"] == ("eos" if expected[-1] == EOS else "length")
        assert record["prefill_s"] > 0 and record["batch_size"] in (1, 2, 3)
        assert set(record) == {"id", *OUTPUT_KEYS}
    # batches by bucket: the four 128-bucket prompts in batches of 3 and 1, the two 256-bucket ones together
    assert sorted(r["batch_size"] for r in records) == [1, 2, 2, 3, 3, 3]


def test_chat_applies_the_template(tiny, capsys, tmp_path):
    src, ckpt = tiny
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps("w20 w21 w22") + "\n")
    code, stdout, err = _run([ckpt, "--jsonl", source, "--chat", "--max-new-tokens", 5, "--quiet"], capsys)
    assert code == 0, err
    (record,) = [json.loads(line) for line in stdout.splitlines()]
    ids = checkpoint.tokenizer(ckpt)("w5 w20 w21 w22 w6 w7")["input_ids"]  # the template's text
    assert record["prompt_tokens"] == 6 and record["text"] == _text(_hf_greedy(src, ids, 5))


@pytest.mark.parametrize("sig, to_file", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["SIGINT-out-file", "SIGTERM-stdout"])
def test_an_interrupted_jsonl_run_keeps_its_finished_lines(tiny, tmp_path, sig, to_file):
    _, ckpt = tiny
    source = tmp_path / "in.jsonl"
    # one prompt per bucket, one per batch: every batch compiles, so the run lasts long enough to stop
    source.write_text("".join(json.dumps(_words(i, 100 * i + 20)) + "\n" for i in range(12)))
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "tmjax.cli", "generate", str(ckpt), "--jsonl", str(source), "--max-new-tokens", "4",
            "--batch-size", "1", "--quiet"] + (["--out", str(out)] if to_file else [])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # stdout buffered as usual
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "JAX_PLATFORMS": "cpu"})
    streamed: list[str] = []  # stdout lines as they arrive (they must be flushed to get here)
    reader = threading.Thread(target=lambda: streamed.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while len(out.read_text().splitlines() if to_file and out.exists() else streamed) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline, "no line was written"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = proc.stderr.read()
    lines = out.read_text().splitlines(keepends=True) if to_file else streamed
    assert proc.returncode == 128 + sig, err
    assert 2 <= len(lines) < 12 and all(line.endswith("\n") and json.loads(line)["text"] for line in lines)
    where = f"; {out} holds their lines" if to_file else ""
    assert err.strip().splitlines()[-1] == f"tmjax generate: interrupted after {len(lines)} of 12 prompts{where}"
    assert "Traceback" not in err


def test_bad_input_is_one_line_before_loading(tiny, capsys, tmp_path, monkeypatch):
    _, ckpt = tiny
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("loaded the weights"))
    (tmp_path / "bad.jsonl").write_text('"w3"\n{"prompt": 3}\n')
    (tmp_path / "broken.jsonl").write_text('"w3"\n{"prompt": "w4"\n')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "exists.jsonl").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    cases = [
        ([tmp_path / "nowhere", "--prompt", "w3"], "is not a tmjax checkpoint folder"),
        ([ckpt, "--jsonl", tmp_path / "bad.jsonl"], 'bad.jsonl:2: the object needs a "prompt" string'),
        ([ckpt, "--jsonl", tmp_path / "broken.jsonl"], "broken.jsonl:2: not valid JSON"),
        ([ckpt, "--jsonl", tmp_path / "empty.jsonl"], "holds no prompts"),
        ([ckpt, "--jsonl", tmp_path / "missing.jsonl"], "missing.jsonl does not exist"),
        ([ckpt, "--prompt-file", tmp_path / "latin1.txt"], "is not UTF-8 text"),
        ([ckpt, "--prompt", "  "], "the prompt is empty"),
        ([ckpt, "--prompt", "w3", "--out", tmp_path / "exists.jsonl"], "already exists"),
        ([ckpt, "--prompt", "w3", "--out", tmp_path / "no" / "out.jsonl"], "is not a writable directory"),
        ([ckpt, "--prompt", "w3", "--switch-layer", 99], r"--switch-layer must be in 0..3"),
        ([ckpt, "--prompt", "w3", "--switch-layer", 1, "--n-local", 0], "--n-local must be >= 1"),
        ([ckpt, "--prompt", "w3", "--max-new-tokens", 0], "--max-new-tokens must be >= 1"),
        ([ckpt, "--prompt", "w3", "--temperature", "nan"], "--temperature must be a finite number"),
        ([ckpt, "--prompt", "w3", "--batch-size", 0], "--batch-size must be >= 1"),
    ]
    for argv, needle in cases:
        code, out, err = _run(argv, capsys)
        assert code == 1 and out == "", (argv, err)
        assert err.count("\n") == 1 and err.startswith("tmjax generate: error: ") and needle in err, (argv, err)
    code, _, err = _run([ckpt, "--prompt", "w3", "--jsonl", tmp_path / "bad.jsonl"], capsys)
    assert code == 2 and "not allowed with argument" in err  # argparse: one source only


# Runs `tmjax generate` in a child process whose prefill first does ACTION: stop or crash after the model
# loaded and before any line is finished.
_STOPPING_CHILD = """
import os, signal, sys
import tmjax, tmjax.api
from tmjax.generate_cli import main
def prefill(*args, **kwargs):
    if sys.argv[1] == "crash":
        raise RuntimeError("crashed in prefill")
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    raise AssertionError("the signal did not stop the run")
tmjax.prefill = tmjax.api.prefill = prefill
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("action, source", [("SIGINT", "prompt"), ("SIGTERM", "jsonl"), ("crash", "jsonl")])
def test_out_is_created_only_with_its_first_line(tiny, tmp_path, action, source):
    """A run stopped (or crashed) after the model loaded, before any prompt finished, leaves no --out
    file, so that the same command runs again; that rerun writes it whole."""
    _, ckpt = tiny
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "w3 w4", "id": 7}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [str(ckpt), "--max-new-tokens", "2", "--quiet", "--out", str(out)]
    argv += ["--prompt", "w3 w4"] if source == "prompt" else ["--jsonl", str(tmp_path / "in.jsonl")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _STOPPING_CHILD, action, *argv], capture_output=True, text=True,
                          env=env, timeout=300)
    if action == "crash":
        assert proc.returncode == 1 and "crashed in prefill" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 128 + getattr(signal, action), proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "tmjax generate: interrupted after 0 of 1 prompts"
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "generate", *argv], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["line"] == 1 and record["prompt_tokens"] == 2 and record.get("id", 7) == 7


def test_jsonl_keys_that_the_output_writes_are_refused(tiny, tmp_path):
    """An input object's own "text" (or any key the output line writes) would be overwritten: refused up
    front, naming the key and the line, before the weights load; other keys are copied (see above)."""
    _, ckpt = tiny
    for key in OUTPUT_KEYS:
        source = tmp_path / f"{key}.jsonl"
        source.write_text('"w3"\n' + json.dumps({"prompt": "w3", "id": 1, key: "mine"}) + "\n")
        if key != "line":
            continue  # one run through the CLI; the others in-process below
        proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "generate", str(ckpt), "--jsonl", str(source)],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr == f"tmjax generate: error: {source}:2: key 'line' is one the output line writes " \
            f"(with {', '.join(OUTPUT_KEYS)}); rename it so that it is copied, not overwritten\n"
    from tmjax.generate_cli import _jsonl_prompts
    for key in OUTPUT_KEYS:
        with pytest.raises(ValueError, match=f"{key}.jsonl:2: key '{key}' is one the output line writes"):
            _jsonl_prompts(tmp_path / f"{key}.jsonl")


def test_seed_and_max_new_tokens_out_of_range_are_one_line_before_loading(tiny, capsys):
    """Through the CLI: a seed jax cannot take (was an OverflowError traceback) and more new tokens than
    the model's positions (was XLA's out-of-memory traceback), each one line naming the argument."""
    _, ckpt = tiny
    positions = checkpoint.read_config(ckpt).max_position_embeddings
    cases = [(["--seed", "99999999999999999999", "--temperature", "1"],
              "--seed must be in [-2**63, 2**63 - 1] (a 64-bit integer), got 99999999999999999999"),
             (["--max-new-tokens", "1000000000"], f"--max-new-tokens must be at most {max(positions, 1024)} (the "
                                                  f"model's max_position_embeddings {positions}, or 1024 if larger), "
                                                  "got 1000000000")]
    for extra, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "generate", str(ckpt), "--prompt", "w3", *extra],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert proc.stderr == f"tmjax generate: error: {needle}\n"
    for seed in (-(2**63), 2**63 - 1):  # the extremes are taken
        code, _, err = _run([ckpt, "--prompt", "w3 w4", "--max-new-tokens", 2, "--temperature", 1, "--seed", seed],
                            capsys)
        assert code == 0, err


def test_smollm2_one_prompt_and_a_jsonl(capsys, tmp_path):
    """The real model: a chat prompt streamed, and a JSONL of mixed lengths in batches, each line the
    same text as transformers' greedy generation from the GGUF (its own loader) for that prompt alone."""
    from transformers import AutoModelForCausalLM

    from tmjax.default_model import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    ckpt = tmp_path / "smollm2"
    assert convert_main([str(gguf), str(ckpt), "--dtype", "float32", "--quiet"]) == 0
    tokenizer = checkpoint.tokenizer(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()

    def expected(prompt: str, new: int) -> str:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.as_tensor([ids]), max_new_tokens=new, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    code, out, err = _run([ckpt, "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", 8],
                          capsys)
    assert code == 0, err
    assert out == expected("What is the capital of France?", 8) + "\n"
    prompts = ["Name three colors.", "Write a haiku about the sea. " + "Make it calm and slow. " * 30, "Say hi."]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    code, out, err = _run([ckpt, "--jsonl", source, "--chat", "--max-new-tokens", 6, "--batch-size", 4], capsys)
    assert code == 0, err
    records = {r["line"]: r for r in map(json.loads, out.splitlines())}
    assert sorted(records) == [1, 2, 3] and records[1]["batch_size"] == 2  # lines 1 and 3 share a bucket
    for line, prompt in enumerate(prompts, start=1):
        assert records[line]["text"] == expected(prompt, 6), records[line]
