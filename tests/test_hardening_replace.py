"""`--force` replaces only a complete checkpoint, a replace killed half-way loses neither version, the
checksum manifest catches a damaged file, non-float weights are refused, and the folder follows the umask.

References: directory snapshots taken before the run (bytes of every file), xxhash computed here on the
raw files, the torch module that was saved, and the mode bits the umask implies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
from safetensors.numpy import load_file, save_file
from test_convert import assert_matches_torch, leftovers, run, tiny_model, write_tiny_gguf

import tmjax.checkpoint as ckpt

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """kind -> (torch model, HF folder) for two models whose checkpoints are easy to tell apart."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for kind in ("qwen2", "qwen3"):
        model = tiny_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


@pytest.fixture(scope="module")
def good(sources, tmp_path_factory) -> Path:
    """A float32 checkpoint of the qwen2 model; tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    assert run(sources["qwen2"][1], folder, "--dtype", "float32") == 0
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _largest_weight_file(folder: Path) -> Path:
    return max((p for p in (folder / "weights").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


# --- class 1: what --force may replace ---

def _lookalikes():
    """name -> edit(folder copied from a good checkpoint) that leaves something --force must not delete."""

    def tmjax_json_only(f):  # the case: a file named tmjax.json next to the user's own files
        shutil.rmtree(f)
        f.mkdir()
        (f / "tmjax.json").write_text("{}")
        (f / "thesis.tex").write_text("years of work")

    def user_file_inside(f):
        (f / "notes.txt").write_text("mine")

    def unfinished_orbax(f):
        (f / "weights" / "_CHECKPOINT_METADATA").unlink()

    def no_weights(f):
        shutil.rmtree(f / "weights")

    def truncated_weights(f):
        path = _largest_weight_file(f)
        path.write_bytes(path.read_bytes()[:-10])

    def config_is_a_list(f):
        (f / "config.json").write_text("[]")

    def no_manifest(f):
        _rewrite_json(f / "tmjax.json", lambda m: {k: v for k, v in m.items() if k != "files"})

    return {fn.__name__: fn for fn in (tmjax_json_only, user_file_inside, unfinished_orbax, no_weights,
                                         truncated_weights, config_is_a_list, no_manifest)}


@pytest.mark.parametrize("case", list(_lookalikes()))
def test_force_refuses_anything_but_a_complete_checkpoint(sources, good, tmp_path, capsys, case):
    dst = tmp_path / "dst"
    shutil.copytree(good, dst)
    _lookalikes()[case](dst)
    before = snapshot(dst)
    assert run(sources["qwen3"][1], dst, "--force") == 1
    err = capsys.readouterr().err
    assert "refusing to replace" in err and str(dst) in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_force_replaces_a_complete_checkpoint_and_an_empty_folder(sources, good, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(good, dst)
    assert run(sources["qwen3"][1], dst, "--force", "--dtype", "float32") == 0
    assert_matches_torch(ckpt.load(dst), sources["qwen3"][0])
    (tmp_path / "empty").mkdir()
    assert run(sources["qwen2"][1], tmp_path / "empty", "--force", "--dtype", "float32") == 0
    assert_matches_torch(ckpt.load(tmp_path / "empty"), sources["qwen2"][0])
    assert sorted(os.listdir(tmp_path)) == ["dst", "empty"]


# --- class 2: the replace window ---

_NO_EXCHANGE = (  # the fallback path: rename the old one to a backup, then the new one into place
    "import sys\n"
    "from tmjax.convert import writer\n"
    "writer._exchange = lambda a, b: False\n"
    "from tmjax.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {what} (exit code {proc.poll()}): {proc.communicate()[1]}")
        time.sleep(0.01)


def _start_replace(src: Path, dst: Path, *, exchange: bool) -> subprocess.Popen:
    code = ["-m", "tmjax.cli"] if exchange else ["-c", _NO_EXCHANGE]
    return subprocess.Popen([sys.executable, *code, "convert", str(src), str(dst), "--force", "--quiet",
                             "--dtype", "float32"], env={**ENV, "TMJAX_TEST_PAUSE_IN_REPLACE": "60"},
                            stderr=subprocess.PIPE, text=True)


def test_kill_between_the_two_renames_keeps_the_old_checkpoint(sources, good, tmp_path, capsys):
    dst = tmp_path / "dst"
    shutil.copytree(good, dst)
    proc = _start_replace(sources["qwen3"][1], dst, exchange=False)
    _wait_for(lambda: not dst.exists(), proc, "DST moved aside")
    proc.kill()
    proc.wait()
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("dst.tmjax-backup-")]
    assert len(backups) == 1 and not dst.exists()
    # the next run, even one that fails, puts the old checkpoint back first
    assert run(tmp_path / "no-such-source", dst, "--force") == 1
    assert "restored" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    assert_matches_torch(ckpt.load(dst), sources["qwen2"][0])


def test_kill_after_the_atomic_swap_leaves_the_new_checkpoint(sources, good, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(good, dst)
    proc = _start_replace(sources["qwen3"][1], dst, exchange=True)
    new_src = str(sources["qwen3"][1])
    _wait_for(lambda: json.loads((dst / "tmjax.json").read_text())["source"] == new_src, proc, "the swap")
    assert dst.exists()  # never missing: the swap is one step
    proc.kill()
    proc.wait()
    assert_matches_torch(ckpt.load(dst), sources["qwen3"][0])
    assert run(tmp_path / "no-such-source", dst) == 1  # any later run removes the dead run's staging
    assert sorted(os.listdir(tmp_path)) == ["dst"]


# --- class 4: integrity and dtypes ---

def test_manifest_records_size_and_xxh3_of_every_file(good):
    files = json.loads((good / "tmjax.json").read_text())["files"]
    on_disk = {p.relative_to(good).as_posix(): p for p in good.rglob("*") if p.is_file() and p.name != "tmjax.json"}
    assert files.keys() == on_disk.keys()
    assert {"config.json", "weights/_CHECKPOINT_METADATA"} <= files.keys()
    for rel, path in on_disk.items():
        data = path.read_bytes()
        assert files[rel] == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, rel


def test_a_zeroed_run_of_bytes_is_named_by_load(sources, good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    victim = _largest_weight_file(folder)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 100] = bytes(100)
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{victim}.*checksum"):
        ckpt.load(folder)
    # what the check prevents: without it the damaged weights load and differ from the model's
    damaged = ckpt.load(folder, verify=False)
    with pytest.raises(AssertionError):
        assert_matches_torch(damaged, sources["qwen2"][0])
    assert_matches_torch(ckpt.load(good), sources["qwen2"][0])


def test_an_edited_side_file_is_named_by_load(good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    _rewrite_json(folder / "config.json", lambda c: {**c, "rms_norm_eps": 0.5})
    with pytest.raises(ValueError, match="config.json"):
        ckpt.load(folder)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int8, np.bool_])
def test_integer_and_bool_tensors_are_refused_by_name(sources, tmp_path, capsys, dtype):
    src = tmp_path / "src"
    shutil.copytree(sources["qwen2"][1], src)
    name = "model.layers.1.mlp.up_proj.weight"
    state = load_file(src / "model.safetensors")
    state[name] = (state[name] > 0).astype(dtype)
    save_file(state, src / "model.safetensors")
    assert run(src, tmp_path / "dst") == 1
    err = capsys.readouterr().err
    assert name in err and np.dtype(dtype).name in err, err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_integer_gguf_tensor_is_refused_by_name(tmp_path, capsys):
    def as_int(name, w):
        return w.astype(np.int32) if name == "blk.0.ffn_norm.weight" else w

    write_tiny_gguf(tiny_model("llama_bias"), tmp_path / "tiny.gguf", edit=as_int)
    assert run(tmp_path / "tiny.gguf", tmp_path / "dst") == 1
    err = capsys.readouterr().err
    assert "blk.0.ffn_norm.weight" in err and "I32" in err, err
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


# --- class 9: permissions ---

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_folder_follows_the_umask(sources, tmp_path, umask):
    dst = tmp_path / "dst"
    proc = subprocess.run([sys.executable, "-m", "tmjax.cli", "convert", str(sources["qwen2"][1]), str(dst),
                           "--quiet"], env=ENV, capture_output=True, text=True, umask=umask)
    assert proc.returncode == 0, proc.stderr
    for path in [dst, *dst.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))


def test_stale_staging_of_a_killed_run_is_removed_by_a_failing_run(sources, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".dst.partial-{dead.pid}-abc" / "weights").mkdir(parents=True)
    assert run(tmp_path / "no-such-source", tmp_path / "dst") == 1
    assert leftovers(tmp_path) == []


# --- class 6/9: a refused load leaves no orbax reads in flight ---

_LOAD_THEN_DELETE = """
import gc, shutil, sys, time
import tmjax
try:
    tmjax.load(sys.argv[1])
except ValueError as err:
    print("refused:", err)
shutil.rmtree(sys.argv[1])
gc.collect()
time.sleep(1)
"""


def test_a_refused_load_leaves_no_reads_in_flight(good, tmp_path):
    """A config that disagrees with the stored shapes (manifest updated to match) is refused before
    orbax reads anything: no "Event loop is closed" or "Encountered error while reading array index"
    from reads still running after the error, or after the folder is gone."""
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    _rewrite_json(folder / "config.json", lambda c: {**c, "intermediate_size": 40})
    _rewrite_json(folder / "tmjax.json", lambda m: {**m, "files": ckpt.build_manifest(folder)})
    proc = subprocess.run([sys.executable, "-c", _LOAD_THEN_DELETE, str(folder)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "config.json implies" in proc.stdout, proc.stdout
    for noise in ("Traceback", "Exception ignored", "Event loop is closed", "Encountered error"):
        assert noise not in proc.stderr, proc.stderr
