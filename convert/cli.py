"""``tmjax convert SRC DST``: a Hugging Face folder or a GGUF file -> a tmjax checkpoint.

Everything that can be checked before writing is checked first (destination, config, tensor names);
tensors are then streamed one at a time into the target tree, which is saved all-or-nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tmjax import interrupts
from tmjax.checkpoint import DTYPES
from tmjax.convert import writer
from tmjax.convert.mapping import expected_hf_names, unexpected_hf_names, weights_from_hf
from tmjax.models.config import ModelConfig

if TYPE_CHECKING:  # the sources are imported on use: each pulls in its own reader library
    from tmjax.convert.gguf_source import GGUFSource
    from tmjax.convert.safetensors_source import SafetensorsSource

_LISTED = 5  # how many offending tensor names an error message shows


def open_source(src: Path) -> SafetensorsSource | GGUFSource:
    """A ``SafetensorsSource`` for a folder, a ``GGUFSource`` for a ``.gguf`` file."""
    if src.is_dir():
        from tmjax.convert.safetensors_source import SafetensorsSource

        return SafetensorsSource(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        from tmjax.convert.gguf_source import GGUFSource

        return GGUFSource(src)
    raise ValueError(f"source {src} is neither a Hugging Face model folder nor a .gguf file")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def untie_a_distinct_head(hf_config: dict, names: list[str], get_tensor: Callable[[str], Any]) -> dict | None:
    """The config to convert with when ``config.json`` says ``tie_word_embeddings`` but the source
    also holds an ``lm_head.weight`` that differs from the embedding: the same config with the flag
    false, as transformers 5 does when it loads such a folder (it keeps the distinct head and warns).
    ``None`` when there is nothing to untie (no such head, or one equal to the embedding)."""
    if hf_config.get("tie_word_embeddings") is not True or not {"lm_head.weight", "model.embed_tokens.weight"} <= set(names):
        return None
    head, embed = get_tensor("lm_head.weight"), get_tensor("model.embed_tokens.weight")
    if head.shape == embed.shape and np.array_equal(head, embed):
        return None
    return {**hf_config, "tie_word_embeddings": False}


def check_tensor_names(config: ModelConfig, names: list[str], src: Path) -> None:
    """Fail before any work if the source lacks a tensor the model needs or has one it cannot place."""
    present = set(names)
    missing = [n for n in expected_hf_names(config) if n not in present]
    if missing:
        raise ValueError(f"{src}: missing tensor(s) {_names(missing)}")
    extra = unexpected_hf_names(config, names)
    if extra:
        raise ValueError(f"{src}: unexpected tensor(s) {_names(extra)} for this {config.architecture} config")


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """Called after each tensor: a safe point to stop at, and a progress bar step when ``enabled``."""
    if not enabled:
        yield lambda name: interrupts.check()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("converting tensors", total=total)

        def advance(name: str) -> None:
            interrupts.check()
            bar.advance(task)

        yield advance


def convert(src: str | Path, dst: str | Path, *, dtype: str = "bfloat16", force: bool = False,
            progress: bool = True) -> Path:
    """Convert ``src`` into a tmjax checkpoint at ``dst`` (returned, absolute).

    Raises ``ValueError`` for bad input, ``FileExistsError`` for an existing ``dst`` (without
    ``force``), ``interrupts.Interrupted`` for SIGINT/SIGTERM while inside ``interrupts.handled()``;
    in each case nothing is left at ``dst`` (and an old checkpoint there is kept).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    src, dst = Path(src).absolute(), Path(dst).absolute()
    writer.check_destination(dst, force)
    if not src.exists():
        raise ValueError(f"source {src} does not exist")
    with open_source(src) as source:
        try:
            config = ModelConfig.from_hf(source.hf_config)
        except ValueError as err:
            raise ValueError(f"{src}: cannot map its config: {err}") from None
        names = source.names()
        hf_config = source.hf_config
        untied = untie_a_distinct_head(hf_config, names, source.get_tensor)
        if untied is not None:
            print(f"tmjax convert: note: {src}/config.json says tie_word_embeddings true, but lm_head.weight differs "
                  "from the embedding: keeping it (untied), as transformers does", file=sys.stderr)
            hf_config, config = untied, ModelConfig.from_hf(untied)
        check_tensor_names(config, names, src)
        writer.check_free_space(dst, config, dtype)
        interrupts.check()
        with writer.staged_output(dst, force=force) as staging:
            with _progress(len(expected_hf_names(config)), progress) as advance:
                weights = weights_from_hf(config, source.get_tensor, dtype, on_tensor=advance)
            writer.save_weights(staging, weights)
            del weights
            writer.write_config(staging, hf_config)
            source.write_side_files(staging)
            interrupts.check()
            writer.write_meta(staging, dtype=dtype, source=str(src), source_format=source.FORMAT)
    return dst


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmjax convert",
        description="Convert a Hugging Face model folder (config.json + safetensors) or a .gguf file "
        "into a tmjax checkpoint folder (config.json, tmjax.json, orbax weights, tokenizer files).",
    )
    parser.add_argument("src", type=Path, help="Hugging Face model folder or .gguf file")
    parser.add_argument("dst", type=Path, help="checkpoint folder to create")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _message(err: Exception) -> str:
    """One line for the user; a full disk says where and what to do."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on the device of {err.filename} ({err.strerror}): free some space or choose another DST"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tmjax convert``; returns the process exit code.

    SIGINT and SIGTERM stop the conversion cleanly (see ``tmjax.interrupts``): one line on stderr, exit
    code 128 + the signal number, no staging folder left and an old checkpoint at DST kept.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error (argparse has printed it)
        return int(exit_.code or 0)
    with interrupts.handled():
        try:
            dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet)
        except (ValueError, OSError) as err:
            print(f"tmjax convert: error: {_message(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            print(f"tmjax convert: interrupted; {args.dst} was left as it was", file=sys.stderr)
            return interrupts.exit_code(err)
        signum = interrupts.received()
    if signum is not None:  # it came while the finished checkpoint was being moved into place
        print(f"tmjax convert: interrupted, but the conversion had finished: {dst} is complete", file=sys.stderr)
        return 128 + signum
    print(f"tmjax convert: wrote {dst} ({args.dtype})", file=sys.stderr)
    return 0
