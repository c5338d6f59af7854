"""Bad input gets one clear message naming what to fix, before any expensive work (issue 10, classes
6, 7 and 9): malformed configs and indexes, GGUF files, checkpoints, the demo's cache and options, the
eval/probe options, a full disk, and the `tmjax` command itself (`--version`, `python -m tmjax`,
`--help` without jax).

CLI cases run as subprocesses. "Before any model work" is checked by giving each command a model
that does not exist (or a cache that must stay empty): the option error has to come first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert import run, tiny_model, write_tiny_gguf

import tmjax.checkpoint as ckpt
from tmjax.models.config import ModelConfig

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def tmjax_cli(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tmjax", *map(str, args)], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600, **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "qwen2"
    tiny_model("qwen2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(tiny_model("llama_bias"), path)
    return path


# --- configs (class 6 and 7): each message names the key ---

BASE = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32)
BAD_CONFIGS = {
    "heads_zero": ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer, got 0"),
    "hidden_str": ({"hidden_size": "64"}, "'hidden_size' must be a positive integer, got '64'"),
    "eps_null": ({"rms_norm_eps": None}, "'rms_norm_eps' must be a finite number, got None"),
    "eps_str": ({"rms_norm_eps": "tiny"}, "'rms_norm_eps' must be a finite number, got 'tiny'"),
    "theta_str": ({"rope_theta": "abc"}, "'rope_theta' must be a finite number, got 'abc'"),
    "scaling_str": ({"rope_scaling": "linear"}, "'rope_scaling' must be an object"),
    "factor_str": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "'rope_scaling.factor'"),
    "bias_str": ({"attention_bias": "yes"}, "'attention_bias' must be true or false"),
    "window_float": ({"model_type": "mistral", "sliding_window": 4.5}, "'sliding_window' must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_malformed_config_names_the_key(case):
    edit, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf({**BASE, **edit})
    assert message in str(info.value)


def test_config_that_is_not_an_object():
    with pytest.raises(ValueError, match="must be a JSON object"):
        ModelConfig.from_hf([1, 2])


def test_load_of_a_checkpoint_whose_config_is_a_list(hf_folder, tmp_path):
    assert run(hf_folder, tmp_path / "ckpt") == 0
    (tmp_path / "ckpt" / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json: a model config must be a JSON object"):
        ckpt.read_config(tmp_path / "ckpt")


def test_convert_with_a_malformed_config_is_one_line(hf_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_folder, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": "linear"}))
    assert_one_line_error(tmjax_cli("convert", src, tmp_path / "dst"), "rope_scaling")
    assert not (tmp_path / "dst").exists()


# --- sources (class 6 and 7) ---

def _sharded(hf_folder: Path, tmp_path: Path, weight_map) -> Path:
    src = tmp_path / "src"
    shutil.copytree(hf_folder, src)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(weight_map))
    return src


@pytest.mark.parametrize("case, index, needle", [
    ("list", [], "no 'weight_map' object"),
    ("int", {"weight_map": {"model.norm.weight": 5}}, "maps tensor 'model.norm.weight' to 5"),
    ("escape", {"weight_map": {"model.norm.weight": "../model-00001-of-00001.safetensors"}},
     "to '../model-00001-of-00001.safetensors'; each entry must be the file name of a shard"),
])
def test_bad_index_json(hf_folder, tmp_path, capsys, case, index, needle):
    src = _sharded(hf_folder, tmp_path, index)
    assert run(src, tmp_path / "dst") == 1
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "dst").exists()


def test_gguf_without_token_embedding(tmp_path, capsys):
    write_tiny_gguf(tiny_model("llama_bias"), tmp_path / "x.gguf", vocab_size=False,
                    edit=lambda name, w: None if name == "token_embd.weight" else w)
    assert run(tmp_path / "x.gguf", tmp_path / "dst") == 1
    assert "no token_embd.weight tensor" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="makes a file unreadable for another user: needs root and setpriv")
def test_unreadable_shard_is_not_reported_as_missing(hf_folder, tmp_path_factory):
    # pytest's tmp folders are private to root: this one must be open to the unprivileged user
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"tmjax-perm-{os.getpid()}"
    try:
        shutil.copytree(hf_folder, root / "src")
        root.chmod(0o777)
        (root / "src").chmod(0o755)
        for f in (root / "src").iterdir():
            f.chmod(0o644)
        (root / "src" / "model.safetensors").chmod(0)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                               "-m", "tmjax", "convert", str(root / "src"), str(root / "dst")],
                              env={**ENV, "HOME": str(root)}, capture_output=True, text=True, timeout=600)
        assert_one_line_error(proc, f"cannot read {root / 'src' / 'model.safetensors'}: Permission denied")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_dst_under_a_file(hf_folder, tmp_path):
    (tmp_path / "file").write_text("")
    assert_one_line_error(tmjax_cli("convert", hf_folder, tmp_path / "file" / "dst"),
                          f"{tmp_path / 'file'} is a file, not a folder")


_NO_SPACE_CHECK = (  # the disk fills during orbax's save: the up-front check is bypassed
    "import sys\n"
    "from tmjax.convert import writer\n"
    "writer.check_free_space = lambda *args: None\n"
    "from tmjax.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture()
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_full_disk_is_one_line_before_any_work(hf_folder, small_disk):
    proc = tmjax_cli("convert", hf_folder, small_disk / "dst", "--dtype", "float32")
    assert_one_line_error(proc, f"no space left on the device of {small_disk}", "MiB needed")
    assert os.listdir(small_disk) == []


def test_disk_filling_during_the_save(tmp_path, small_disk):
    src = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(src)  # ~0.1 MB: pad the disk so that the save runs out
    (small_disk / "filler").write_bytes(bytes(1000 * 1024))
    proc = subprocess.run([sys.executable, "-c", _NO_SPACE_CHECK, "convert", str(src), str(small_disk / "dst"),
                           "--quiet", "--dtype", "float32"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("tmjax convert:")]
    assert ours == [f"tmjax convert: error: no space left on the device of {small_disk} (No space left on device "
                    "while writing the weights): free some space or choose another DST"], proc.stderr
    # orbax's per-thread error logs and tensorstore's tracebacks for abandoned writes are not shown
    assert "ERROR:absl" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert os.listdir(small_disk) == ["filler"], [str(p) for p in small_disk.rglob("*")]


# --- the demo (class 6) ---

@pytest.fixture()
def demo_env(tiny_gguf, tmp_path) -> dict:
    """The demo pointed at a 2-layer GGUF and an empty cache."""
    return {"TMJAX_SMOLLM2_GGUF": str(tiny_gguf), "TMJAX_CACHE": str(tmp_path / "cache")}


@pytest.mark.parametrize("args, needle", [
    (["--switch-layer", "999"], "--switch-layer must be in 0..2"),
    (["--switch-layer", "-1"], "--switch-layer must be in 0..2"),
    (["--n-local", "0"], "--n-local must be >= 1"),
    (["--depth", "2"], "--depth must be within 0..1"),
])
def test_demo_options_are_checked_before_converting(demo_env, tmp_path, args, needle):
    assert_one_line_error(tmjax_cli("demo", *args, env=demo_env), needle)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_demo_with_a_bad_gguf_override(tiny_gguf, tmp_path, problem):
    gguf = tmp_path / "model.gguf"
    if problem == "truncated":
        gguf.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    env = {"TMJAX_SMOLLM2_GGUF": str(gguf), "TMJAX_CACHE": str(tmp_path / "cache")}
    assert_one_line_error(tmjax_cli("demo", "--switch-layer", "1", env=env), str(gguf))


def test_demo_with_tmjax_cache_naming_a_file(tiny_gguf, tmp_path):
    (tmp_path / "cache").write_text("")
    env = {"TMJAX_SMOLLM2_GGUF": str(tiny_gguf), "TMJAX_CACHE": str(tmp_path / "cache")}
    assert_one_line_error(tmjax_cli("demo", env=env), "TMJAX_CACHE", "is a file, not a folder")


def test_broken_demo_cache_is_converted_again(demo_env, monkeypatch):
    from tmjax import default_model

    for key, value in demo_env.items():
        monkeypatch.setenv(key, value)
    cached = default_model.smollm2_checkpoint("float32")
    shutil.rmtree(cached / "weights")
    assert default_model.smollm2_checkpoint("float32") == cached
    ckpt.check_complete(cached)
    assert ckpt.load(cached).config.num_layers == 2
    (cached / "thesis.tex").write_text("not ours")  # a folder with foreign files is never deleted
    shutil.rmtree(cached / "weights")
    with pytest.raises(ValueError, match="holds other files"):
        default_model.smollm2_checkpoint("float32")
    assert (cached / "thesis.tex").exists()


# --- eval and probe options (class 6): refused before the model is loaded ---

MISSING_MODEL = ("--checkpoint", "/nonexistent/tmjax-model")


def test_eval_out_naming_a_file(tmp_path):
    (tmp_path / "report").write_text("")
    assert_one_line_error(tmjax_cli("eval", *MISSING_MODEL, "--out", tmp_path / "report"),
                          "--out", "is a file, not a folder")


def test_probe_out_naming_a_file(tmp_path):
    (tmp_path / "report").write_text("")
    assert_one_line_error(tmjax_cli("probe", *MISSING_MODEL, "--out", tmp_path / "report" / "sub"),
                          "--out", "is a file, not a folder")


@pytest.mark.parametrize("content", ['{"switch_layer": 3}', "[1]", "not json"])
def test_eval_probe_json_without_the_key(tmp_path, content):
    (tmp_path / "probe.json").write_text(content)
    proc = tmjax_cli("eval", *MISSING_MODEL, "--probe", tmp_path / "probe.json", "--out", tmp_path / "out")
    assert_one_line_error(proc, "--probe", str(tmp_path / "probe.json"))


@pytest.mark.parametrize("value", ["2", "0", "-0.5"])
def test_probe_threshold_out_of_range(tmp_path, value):
    proc = tmjax_cli("probe", *MISSING_MODEL, "--threshold", value, "--out", tmp_path / "out")
    assert_one_line_error(proc, "--threshold must be in (0, 1)")


# --- the tmjax command (class 9) ---

def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    import tmjax

    proc = tmjax_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tmjax {version('tmjax')}"
    assert tmjax.__version__ == version("tmjax")


def test_python_dash_m_tmjax_runs_the_command():
    proc = tmjax_cli("--help")
    assert proc.returncode == 0 and "convert" in proc.stdout and "demo" in proc.stdout


def test_help_and_version_import_no_jax():
    code = ("import sys\nfrom tmjax.cli import main\nmain(['--help'])\nmain(['--version'])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'orbax', 'torch'))\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
