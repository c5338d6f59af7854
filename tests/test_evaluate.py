"""The accuracy harness: KL and agreement metrics against direct computations, the greedy loop against
``tmjax.generate``, and an end-to-end ``tmjax eval`` run on a tiny random model."""

from __future__ import annotations

import json
import pathlib

import chex
import numpy as np
import pytest
import scipy.special
import scipy.stats
import tokenizers
import transformers
from hf_fixtures import save_tiny_model

from tmjax import api, checkpoint, evaluate, tasks
from tmjax.convert.cli import convert
from tmjax.layout import TriangleMix, VerticalSlash

TINY_LAYERS = 4
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 256 ids, one per byte, spaces split off like GPT-2's."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model = tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    wrapped.chat_template = TEMPLATE
    return wrapped


def tiny_checkpoint(root: pathlib.Path) -> pathlib.Path:
    """A converted tmjax checkpoint of a random 4-layer Llama with the byte tokenizer beside it."""
    src = save_tiny_model(root / "hf", "llama", num_hidden_layers=TINY_LAYERS, max_position_embeddings=1024)
    byte_tokenizer().save_pretrained(src)
    return convert(src, root / "tmjax", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return folder, checkpoint.load(folder), checkpoint.tokenizer(folder)


def test_kl_matches_direct_sum():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=50) * 3, rng.normal(size=50) * 3
    pp, qq = np.exp(p) / np.exp(p).sum(), np.exp(q) / np.exp(q).sum()
    assert evaluate.kl_divergence(p, q) == pytest.approx(float(np.sum(pp * np.log(pp / qq))), rel=1e-9)
    assert evaluate.kl_divergence(p, p + 7.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert evaluate.kl_divergence(p, q) != pytest.approx(evaluate.kl_divergence(q, p), rel=1e-3)
    with pytest.raises(ValueError, match=r"\(50,\) and \(49,\)"):
        evaluate.kl_divergence(p, q[:49])


def test_summary_from_known_rows():
    def row(task, dense, tm, same, kl):
        return {"task": task, "configs": {
            "dense": {"score": dense, "identical_to_dense": True, "first_token_kl": 0.0},
            "switch=2": {"score": tm, "identical_to_dense": same, "first_token_kl": kl}}}

    rows = [row("a", 1.0, 1.0, True, 0.1), row("a", 1.0, 0.0, False, 0.5),
            row("b", 0.5, 0.5, True, 0.0), row("b", 0.0, 0.0, False, 0.2)]
    results = evaluate.summarise(rows, ["dense", "switch=2"])
    assert results["dense"]["accuracy"] == {"a": 100.0, "b": 25.0}
    assert results["switch=2"]["accuracy"] == {"a": 50.0, "b": 25.0}
    assert results["switch=2"]["average"] == 37.5
    assert results["switch=2"]["identical_to_dense"] == 0.5
    assert results["switch=2"]["first_token_kl_mean"] == pytest.approx(0.2)
    assert results["switch=2"]["first_token_kl_max"] == 0.5
    table = evaluate.markdown({"results": results}, recommended=2)
    assert "| switch=2 (recommended) | 50.0 | 25.0 | 37.5 | 50% |" in table
    assert "gap +25.0 points; target <= 1: NOT met" in table


def test_encode_splits_prompt_and_answer(tiny):
    _, _, tokenizer = tiny
    sample = tasks.generate("niah_single", seed=3, max_tokens=400, count=tasks.token_counter(tokenizer))
    encoded = tasks.encode(tokenizer, sample)
    prompt = tokenizer.decode(list(encoded.prompt_ids))
    assert prompt.startswith("<user>Some facts") and prompt.endswith(f"<assistant>{sample.answer_prefix} ")
    assert tokenizer.decode(list(encoded.answer_ids)) == sample.answers[0]
    assert len(encoded.prompt_ids) + sample.max_new_tokens <= 400


def test_greedy_matches_generate(tiny):
    """The harness's prefill + decode_step loop gives the tokens of the one-program ``api.generate``."""
    _, params, _ = tiny
    prompt = np.random.default_rng(1).integers(0, 256, size=300).astype(np.int32)
    layout = TriangleMix(switch_layer=2, n_init=4, n_local=64, n_last=32)
    first, new = evaluate.greedy(params, prompt, layout, max_new_tokens=6, stop_ids=[], cache_room=16)
    expected = api.generate(params, prompt, 6, layout)
    assert new == np.asarray(expected).tolist()
    logits, _ = api.prefill(params, prompt, layout)
    chex.assert_trees_all_close(first, np.asarray(logits), atol=1e-5)


def test_agreement_and_kl_match_direct_prefill_and_generate(tiny):
    """``identical_to_dense`` and ``first_token_kl`` (per sample and summarised) against values computed
    here from ``tmjax.prefill`` logits (KL by scipy) and ``tmjax.generate`` tokens, for configurations
    that do change the answers of a random model: switch 0 (every layer a triangle; the KL is
    asymmetric enough to see its direction) and switch 2 (some answers identical, some not)."""
    _, params, tokenizer = tiny
    samples = tasks.generate_suite(["niah_single"], samples_per_task=2, seed=0, max_tokens=640,
                                   count=tasks.token_counter(tokenizer))
    sizes = dict(n_init=4, n_local=64, n_last=32)
    report = evaluate.evaluate(params, tokenizer, samples, [0, 2], **sizes)
    layouts = {"dense": None, **{f"switch={s}": TriangleMix(switch_layer=s, **sizes) for s in (0, 2)}}
    identical = {name: [] for name in layouts}
    kl = {name: [] for name in layouts}
    reverse_kl = {name: [] for name in layouts}
    for sample, row in zip(samples, report["samples"]):
        ids = np.asarray(tasks.encode(tokenizer, sample).prompt_ids, np.int32)
        room = sample.max_new_tokens  # the cache size evaluate uses: its compiled prefill serves here too
        dense_p = scipy.special.softmax(np.asarray(api.prefill(params, ids, max_new_tokens=room)[0], np.float64))
        dense_tokens = np.asarray(api.generate(params, ids, sample.max_new_tokens))
        for name, layout in layouts.items():
            p = scipy.special.softmax(np.asarray(api.prefill(params, ids, layout, max_new_tokens=room)[0], np.float64))
            tokens = np.asarray(api.generate(params, ids, sample.max_new_tokens, layout))
            identical[name].append(bool(np.array_equal(tokens, dense_tokens)))
            kl[name].append(float(scipy.stats.entropy(dense_p, p)))  # KL(dense || config)
            reverse_kl[name].append(float(scipy.stats.entropy(p, dense_p)))
            got = row["configs"][name]
            assert got["identical_to_dense"] == identical[name][-1], (name, sample.task, sample.seed)
            assert got["first_token_kl"] == pytest.approx(kl[name][-1], rel=1e-3, abs=1e-7), (name, sample.task)
    # the configurations really differ from dense, in both measures, and the KL's direction is visible
    assert identical["switch=2"].count(False) >= 1 and identical["switch=2"].count(True) >= 1
    assert not any(identical["switch=0"]) and min(kl["switch=0"]) > 1e-3
    assert max(abs(a - b) / a for a, b in zip(kl["switch=0"], reverse_kl["switch=0"])) > 1e-2
    for name in layouts:
        summary = report["results"][name]
        assert summary["identical_to_dense"] == pytest.approx(np.mean(identical[name]))
        assert summary["first_token_kl_mean"] == pytest.approx(np.mean(kl[name]), rel=1e-3, abs=1e-7)
        assert summary["first_token_kl_max"] == pytest.approx(np.max(kl[name]), rel=1e-3, abs=1e-7)


def test_combined_configurations_are_compared_with_their_triangle_alone(tiny):
    """A TriangleMix + shallow-method configuration also reports ``identical_to_triangle``: its tokens
    against the same run's TriangleMix alone (whatever the order of ``configs``), per sample as
    ``tmjax.generate`` gives them for the two layouts, summarised with a Wilson interval and a line
    under the table; configurations without a base carry nothing of it."""
    _, params, tokenizer = tiny
    samples = tasks.generate_suite(["niah_single"], samples_per_task=4, seed=3, max_tokens=640,
                                   count=tasks.token_counter(tokenizer))
    sizes = dict(n_init=4, n_local=64, n_last=32)
    # budgets at which this model's answers change in some samples and not in others (jax 0.10.2: 3 of 4 identical)
    shallow = VerticalSlash(vertical=16, slash=64, force_vertical=2, force_slash=4, guard=False)
    combined, alone = TriangleMix(2, **sizes, shallow=shallow), TriangleMix(2, **sizes)
    report = evaluate.evaluate(params, tokenizer, samples, [combined, alone, shallow])
    assert report["triangle_bases"] == {"switch=2+vertical-slash": "switch=2"}
    same = []
    for sample, row in zip(samples, report["samples"]):
        ids = np.asarray(tasks.encode(tokenizer, sample).prompt_ids, np.int32)
        with_method = np.asarray(api.generate(params, ids, sample.max_new_tokens, combined))
        without = np.asarray(api.generate(params, ids, sample.max_new_tokens, alone))
        same.append(bool(np.array_equal(with_method, without)))
        assert row["configs"]["switch=2+vertical-slash"]["identical_to_triangle"] == same[-1], sample.seed
        assert "identical_to_triangle" not in row["configs"]["switch=2"]
        assert "identical_to_triangle" not in row["configs"]["vertical-slash"]
    summary = report["results"]["switch=2+vertical-slash"]
    assert summary["identical_to_triangle_count"] == sum(same)
    assert summary["identical_to_triangle_interval"] == pytest.approx(evaluate.wilson_interval(sum(same), len(same)))
    assert "identical_to_triangle" not in report["results"]["switch=2"]
    line = f"switch=2+vertical-slash {sum(same)}/{len(same)} = {100 * sum(same) / len(same):.0f}% identical"
    assert line in evaluate.markdown(report)


def test_kv_dtype_runs_every_config_with_that_cache_against_the_dense_reference(tiny):
    """``kv_dtype``: the reference ``dense`` keeps the checkpoint's cache; ``dense kv=<dtype>`` and
    ``switch=2 kv=<dtype>`` answer as ``tmjax.generate`` does with that cache, and are compared to the
    reference's tokens. A float32 cache on float32 weights changes nothing (every answer identical)."""
    _, params, tokenizer = tiny
    samples = tasks.generate_suite(["niah_single"], samples_per_task=2, seed=1, max_tokens=640,
                                   count=tasks.token_counter(tokenizer))
    sizes = dict(n_init=4, n_local=64, n_last=32)
    same = evaluate.evaluate(params, tokenizer, samples, [2], kv_dtype="float32", **sizes)
    assert list(same["results"]) == ["dense", "dense kv=float32", "switch=2 kv=float32"]
    assert same["results"]["dense kv=float32"]["identical_to_dense"] == 1.0
    report = evaluate.evaluate(params, tokenizer, samples, [], kv_dtype="float8_e4m3fn")
    assert report["kv_dtype"] == "float8_e4m3fn" and list(report["results"]) == ["dense", "dense kv=float8_e4m3fn"]
    for sample, row in zip(samples, report["samples"]):
        ids = np.asarray(tasks.encode(tokenizer, sample).prompt_ids, np.int32)
        dense = np.asarray(api.generate(params, ids, sample.max_new_tokens))
        fp8 = np.asarray(api.generate(params, ids, sample.max_new_tokens, kv_dtype="float8_e4m3fn"))
        assert row["configs"]["dense kv=float8_e4m3fn"]["identical_to_dense"] == bool(np.array_equal(dense, fp8))


def test_eval_cli_end_to_end(tiny, tmp_path, monkeypatch):
    folder, _, _ = tiny
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")  # restored after the test
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps({"recommended_switch_layer": 3}))
    out = tmp_path / "out"
    code = evaluate.eval_main([
        "--checkpoint", str(folder), "--tasks", "niah_single,variable_tracking", "--samples-per-task", "2",
        "--max-tokens", "640", "--switch-layers", "0,2", "--probe", str(probe_file),
        "--n-init", "4", "--n-local", "64", "--n-last", "32", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert list(report["results"]) == ["dense", "switch=0", "switch=2", "switch=3"]
    assert (out / "accuracy.png").stat().st_size > 0
    assert "switch=3 (recommended)" in (out / "accuracy.md").read_text()
    assert len(report["samples"]) == 4
    # the CLI asked for deterministic GPU ops and kept the user's own flags (recorded in the report)
    assert report["xla_flags"] == "--xla_cpu_enable_fast_math=false --xla_gpu_deterministic_ops=true"
    for sample in report["samples"]:
        assert sample["prompt_tokens"] + sample["max_new_tokens"] < 640
        for result in sample["configs"].values():
            assert result["score"] == tasks.score(result["output"], sample["answers"])
    dense = report["results"]["dense"]
    assert dense["identical_to_dense"] == 1.0 and dense["first_token_kl_max"] == 0.0
    # A random model with a 64-token window cannot be unaffected by losing the middle of a
    # 300+ token prompt in every layer: the metrics must see it.
    assert report["results"]["switch=0"]["first_token_kl_mean"] > 1e-4
    # Recompute one configuration's summary from the per-sample records.
    rows = report["samples"]
    recomputed = evaluate.summarise(rows, ["switch=2"])["switch=2"]
    assert recomputed == report["results"]["switch=2"]


@pytest.mark.parametrize("signal_at_call", [4, 2], ids=["after-one-sample", "before-any-sample"])
def test_a_stopped_eval_reports_its_finished_samples(tiny, tmp_path, monkeypatch, signal_at_call):
    """SIGTERM (what `timeout` sends) in the middle of a run: the report holds the finished samples (whole
    rows, summarised from them), says it was interrupted, and the exit code is 128 + 15; stopped before
    any sample finished, nothing is written. Through ``tmjax.cli.main``, which installs the handler."""
    import os
    import signal

    from tmjax import cli

    folder, _, _ = tiny
    calls = {"n": 0}
    real_greedy = evaluate.greedy

    def greedy_then_signal(*args, **kwargs):  # 2 configurations per sample: call 4 ends sample 2
        calls["n"] += 1
        if calls["n"] == signal_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_greedy(*args, **kwargs)

    monkeypatch.setattr(evaluate, "greedy", greedy_then_signal)
    out = tmp_path / "out"
    code = cli.main(["eval", "--checkpoint", str(folder), "--tasks", "niah_single", "--samples-per-task", "3",
                     "--max-tokens", "400", "--switch-layers", "2", "--out", str(out)])
    assert code == 128 + signal.SIGTERM
    if signal_at_call == 2:
        assert not out.exists() or not any(out.iterdir())
        return
    report = json.loads((out / "accuracy.json").read_text())
    assert len(report["samples"]) == 1  # the second sample was cut: not reported
    assert report["interrupted"].startswith("SIGTERM after 1 of 3 samples")
    assert report["results"] == evaluate.summarise(report["samples"], ["dense", "switch=2"])
    assert "1 of 3 samples, interrupted" in (out / "accuracy.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.json", "accuracy.md", "accuracy.png"]


def test_deterministic_gpu_flag_added_unless_the_user_chose():
    env: dict[str, str] = {}
    evaluate.deterministic_gpu(env)
    assert env["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=true"
    env = {"XLA_FLAGS": "--xla_gpu_autotune_level=0"}
    evaluate.deterministic_gpu(env)
    assert env["XLA_FLAGS"].split() == ["--xla_gpu_autotune_level=0", "--xla_gpu_deterministic_ops=true"]
    env = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}  # the user's explicit choice stands
    evaluate.deterministic_gpu(env)
    assert env["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"


def test_bad_input_is_refused(tiny, capsys):
    folder, params, tokenizer = tiny
    sample = tasks.generate("niah_single", seed=0, max_tokens=400, count=tasks.token_counter(tokenizer))
    with pytest.raises(ValueError, match="switch_layer=9"):
        evaluate.evaluate(params, tokenizer, [sample], [9])
    assert evaluate.eval_main(["--checkpoint", str(folder), "--switch-layers", "1,x"]) == 1
    assert "tmjax eval: error: --switch-layers must be comma-separated integers, got '1,x'" in capsys.readouterr().err
    assert evaluate.eval_main(["--checkpoint", str(folder), "--tasks", "niah_single,haystack"]) == 1
    assert "['haystack']" in capsys.readouterr().err
    assert evaluate.eval_main(["--checkpoint", str(folder), "--switch-layers", "2,7", "--max-tokens", "400",
                               "--tasks", "niah_single", "--samples-per-task", "1"]) == 1
    assert "switch_layer=7" in capsys.readouterr().err
