"""Write a tmjax checkpoint all-or-nothing.

Everything goes into a hidden staging folder beside the destination, which is renamed to the
destination only once complete; any failure removes the staging folder. So an interrupted or failed
conversion never leaves a folder at the destination, let alone one ``tmjax.load`` would accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from tmjax.checkpoint import CONFIG_FILE, FORMAT, META_FILE, VERSION, WEIGHTS_DIR


def _staging_prefix(dst: Path) -> str:
    return f".{dst.name}.partial-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(dst: Path) -> None:
    """Delete staging folders for ``dst`` left by conversions that were killed (their pid is gone)."""
    pattern = re.compile(re.escape(f".{dst.name}.partial-") + r"(\d+)-")
    for entry in dst.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def check_destination(dst: Path, force: bool) -> None:
    """Refuse an existing ``dst`` unless ``force``; even then, only replace an old checkpoint or an
    empty folder, so that a mistyped path cannot delete unrelated data."""
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"destination {dst} already exists (use --force to overwrite it)")
    if dst.is_dir() and not dst.is_symlink() and ((dst / META_FILE).exists() or not any(dst.iterdir())):
        return
    raise FileExistsError(
        f"destination {dst} exists and is not a tmjax checkpoint or an empty folder; "
        "refusing to replace it even with --force"
    )


@contextlib.contextmanager
def staged_output(dst: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit it becomes ``dst`` (replacing an old one)."""
    dst = Path(dst).absolute()
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dst)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
    try:
        yield staging
        check_destination(dst, force)  # again: something may have appeared at dst meanwhile
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
            os.replace(dst, old / "old")
            os.rename(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class _Shared(np.ndarray):
    """An array view whose deep copy is itself (see ``save_weights``)."""

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


def save_weights(folder: Path, weights: dict) -> None:
    """Save the weight tree (numpy arrays) with orbax into ``folder/weights``, restorable by
    ``ocp.StandardCheckpointer``.

    By default orbax deep-copies host arrays (in case they change during an async save) and
    zstd-compresses them; both would double the converter's peak memory, for weights that are never
    touched again and barely compress. So the arrays go in as views that deep-copy to themselves, and
    uncompressed.
    """
    import orbax.checkpoint as ocp  # deferred: slow to import

    shared = jax.tree.map(lambda a: np.asarray(a).view(_Shared), weights)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    try:
        checkpointer.save(Path(folder).absolute() / WEIGHTS_DIR, args=ocp.args.PyTreeSave(shared))
    finally:
        checkpointer.close()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_config(folder: Path, hf_config: dict) -> None:
    """The Hugging Face ``config.json`` the weights correspond to."""
    write_json(folder / CONFIG_FILE, hf_config)


def write_meta(folder: Path, *, dtype: str, source: str, source_format: str) -> None:
    """``tmjax.json``: written last, it marks the staging folder complete."""
    write_json(
        folder / META_FILE,
        {"format": FORMAT, "version": VERSION, "dtype": dtype, "source": source, "source_format": source_format},
    )
