"""Real SIGINT and SIGTERM sent to `tmjax convert` at several moments: while tensors stream, during
orbax's save, inside the replace window, and from inside a gc callback (where Python drops the
exception). Each must end with a non-zero exit, exactly one line on stderr, no staging or orbax temp
folder left, and an old checkpoint at DST untouched (or, after the swap, the new one complete).

References: the torch modules that were saved, and directory listings.
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

import pytest
from test_convert import assert_matches_torch, run, tiny_model, write_tiny_gguf
from transformers import LlamaConfig, LlamaForCausalLM

import tmjax.checkpoint as ckpt

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# ~110 MB in float32: streaming and saving each take long enough to be hit.
BIG = dict(hidden_size=512, intermediate_size=2048, vocab_size=16384, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=128)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big") / "llama"
    LlamaForCausalLM(LlamaConfig(**BIG)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> tuple:
    """An existing checkpoint (qwen2) that an interrupted --force run must leave as it was."""
    model = tiny_model("qwen2")
    root = tmp_path_factory.mktemp("old")
    model.save_pretrained(root / "src")
    assert run(root / "src", root / "ckpt", "--dtype", "float32") == 0
    return model, root / "ckpt"


def _convert(src: Path, dst: Path, *extra: str, pause: str | None = None) -> subprocess.Popen:
    env = dict(ENV, TMJAX_TEST_PAUSE_IN_REPLACE=pause) if pause else ENV
    return subprocess.Popen([sys.executable, "-m", "tmjax.cli", "convert", str(src), str(dst), "--quiet",
                             "--dtype", "float32", *extra], env=env, stderr=subprocess.PIPE, text=True)


def _staging(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def _in_save(parent: Path) -> bool:
    return any((p / "weights").exists() or any(p.glob("weights*")) for p in _staging(parent))


def _streaming(parent: Path) -> bool:
    return bool(_staging(parent)) and not _in_save(parent)


def _signal_when(proc: subprocess.Popen, condition, signum: int, delay: float = 0.0, timeout: float = 120.0) -> bool:
    """Send ``signum`` ``delay`` seconds after ``condition()`` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            time.sleep(delay)
            proc.send_signal(signum)
            return True
        time.sleep(0.002)
    return False


def _assert_clean_stop(proc: subprocess.Popen, signum: int, parent: Path, expect: list[str]) -> str:
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    time.sleep(0.5)  # writer threads that outlived the process's main thread would show up by now
    assert sorted(os.listdir(parent)) == expect  # no staging folder, no *-tmp, no backup
    return lines[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["streaming", "saving"])
def test_signal_while_converting_over_an_old_checkpoint(big_source, old, tmp_path, signum, moment):
    model, old_ckpt = old
    dst = tmp_path / "dst"
    shutil.copytree(old_ckpt, dst)
    proc = _convert(big_source, dst, "--force")
    condition = {"streaming": lambda: _streaming(tmp_path), "saving": lambda: _in_save(tmp_path)}[moment]
    # in the save, 50 ms in: orbax's writer threads are busy then
    delay = {"streaming": 0.0, "saving": 0.05}[moment]
    assert _signal_when(proc, condition, signum, delay), f"the conversion ended before the {moment} moment"
    _assert_clean_stop(proc, signum, tmp_path, ["dst"])
    assert_matches_torch(ckpt.load(dst), model)


def test_sigterm_inside_the_replace_window_finishes_the_replace(big_source, old, tmp_path):
    _, old_ckpt = old
    dst = tmp_path / "dst"
    shutil.copytree(old_ckpt, dst)
    proc = _convert(big_source, dst, "--force", pause="3")

    def swapped() -> bool:
        try:
            return json.loads((dst / "tmjax.json").read_text())["source"] == str(big_source)
        except (OSError, ValueError):
            return False

    assert _signal_when(proc, swapped, signal.SIGTERM)
    line = _assert_clean_stop(proc, signal.SIGTERM, tmp_path, ["dst"])
    assert "complete" in line
    assert ckpt.load(dst).config.hidden_size == BIG["hidden_size"]


_INTERRUPT_IN_GC = """
import gc, os, signal, sys
from pathlib import Path
parent = Path(sys.argv[2]).parent
fired = []

def interrupt_inside_gc(phase, info):
    # once tensors stream, deliver SIGINT while this gc callback runs: Python raises the
    # KeyboardInterrupt here, where gc prints it as "Exception ignored" and drops it
    if not fired and phase == "start" and any(".partial-" in p.name for p in parent.iterdir()):
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))

gc.callbacks.append(interrupt_inside_gc)
from tmjax.cli import main
code = main(["convert", sys.argv[1], sys.argv[2], "--quiet"])
sys.exit(code if fired else 99)
"""


def test_ctrl_c_swallowed_by_a_gc_callback_still_stops_a_gguf_conversion(tmp_path):
    model = tiny_model("llama_bias")
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_IN_GC, str(tmp_path / "tiny.gguf"), str(out / "dst")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "interrupted" in proc.stderr.strip().splitlines()[-1]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr  # one line, no report
    assert os.listdir(out) == []
