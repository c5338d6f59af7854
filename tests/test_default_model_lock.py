"""The default model from several processes at once: with an empty ``$TMJAX_CACHE``, processes started
together must all get the same checkpoint (one converts, the others wait for it), none failing on the
destination another one put in place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tmjax.checkpoint as ckpt
from tmjax.default_model import smollm2_gguf

PROCESSES = 3
CALL = "from tmjax.default_model import smollm2_checkpoint as c; print(c('float32'))"


def _gguf() -> Path:
    try:
        return smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_processes_started_together_share_one_conversion(tmp_path):
    _gguf()
    cache = tmp_path / "cache"
    env = {**os.environ, "TMJAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", CALL], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, out, err in results:
        assert code == 0, err
    paths = {out.strip().splitlines()[-1] for _, out, _ in results}
    assert len(paths) == 1, results
    path = Path(paths.pop())
    ckpt.check_complete(path)
    assert path.parent == cache
    assert sorted(p.name for p in cache.iterdir() if p.name != f".{path.name}.lock") == [path.name]
