"""The ``tmjax`` command as a user meets it: ``--help``, unknown commands, ``tmjax convert`` with its
progress bar (every other test passes ``--quiet``), and where the default model comes from
(``TMJAX_SMOLLM2_GGUF``) and goes (``TMJAX_CACHE``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from test_gguf_families import write_llama_cpp_style

import hf_fixtures
import tmjax
from tmjax import cli, default_model
from tmjax.convert import cli as convert_cli

COMMANDS = ("convert", "generate", "demo", "probe", "eval", "calibrate")  # the subcommands the README documents


def test_console_script_help_lists_every_command():
    exe = Path(sys.executable).parent / "tmjax"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  (\w+) ", proc.stdout, re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS), proc.stdout


def test_no_command_and_unknown_command_exit_2_with_usage(capsys):
    assert cli.main([]) == 2
    assert "usage: tmjax <command>" in capsys.readouterr().out
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'serve'" in err and "usage: tmjax <command>" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_own_help(command, capsys):
    """``tmjax <command> --help`` reaches that command's parser (exit 0, its own usage line)."""
    try:
        code = cli.main([command, "--help"])
    except SystemExit as exit_:  # `tmjax demo` lets argparse exit instead of returning its code
        code = exit_.code
    assert code == 0
    assert f"usage: tmjax {command}" in capsys.readouterr().out


def test_convert_with_its_progress_bar(tmp_path, capsys):
    """Without ``--quiet``: the bar counts every tensor of the source once, and the checkpoint is right."""
    src = hf_fixtures.save_tiny_model(tmp_path / "hf", "qwen3", tie_word_embeddings=False)
    with safe_open(src / "model.safetensors", "np") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    capsys.readouterr()
    assert convert_cli.main([str(src), str(tmp_path / "dst"), "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert f"{len(stored)}/{len(stored)}" in err, err
    assert re.findall(r"\b(\d+)/(\d+)\b", err) == [(str(len(stored)), str(len(stored)))], err
    params = tmjax.load(tmp_path / "dst")
    embedding = np.asarray(params.weights["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(embedding, stored["model.embed_tokens.weight"])


def test_default_model_location_follows_the_environment(tmp_path, monkeypatch):
    """``TMJAX_SMOLLM2_GGUF`` names the GGUF file, ``TMJAX_CACHE`` where its conversion is kept;
    a second call reuses the conversion."""
    hf_fixtures.save_tiny_model(tmp_path / "hf", "qwen2")
    gguf_file = tmp_path / "model.gguf"
    stored = write_llama_cpp_style(hf_fixtures.load_hf(tmp_path / "hf"), gguf_file, "qwen2")
    monkeypatch.setenv("TMJAX_SMOLLM2_GGUF", str(gguf_file))
    monkeypatch.setenv("TMJAX_CACHE", str(tmp_path / "cache"))
    assert default_model.smollm2_gguf() == gguf_file
    folder = default_model.smollm2_checkpoint("float32")
    assert folder.parent == tmp_path / "cache"
    params = tmjax.load(folder)
    np.testing.assert_array_equal(np.asarray(params.weights["norm"]["scale"]), stored["model.norm.weight"])
    written = (folder / "tmjax.json").stat().st_mtime_ns
    assert default_model.smollm2_checkpoint("float32") == folder
    assert (folder / "tmjax.json").stat().st_mtime_ns == written
    monkeypatch.setenv("TMJAX_SMOLLM2_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="TMJAX_SMOLLM2_GGUF=.*absent.gguf"):
        default_model.smollm2_gguf()
