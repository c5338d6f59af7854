"""Write a tmjax checkpoint all-or-nothing, and replace an old one without ever losing both.

Everything goes into a hidden staging folder beside the destination, renamed to the destination only
once complete; any failure removes the staging folder. So an interrupted or failed conversion never
leaves a folder at the destination, let alone one ``tmjax.load`` would accept.

Replacing an existing checkpoint (``--force``) swaps the two folders in one ``renameat2`` call with
``RENAME_EXCHANGE`` where Linux offers it. Elsewhere the old checkpoint is first renamed to a visible
backup ``DST.tmjax-backup-<pid>`` beside it; a run killed before the new one took its place leaves
that backup, and the next conversion to DST puts it back before anything else.

Test hook: ``TMJAX_TEST_PAUSE_IN_REPLACE=<seconds>`` sleeps inside the replace window (after the
swap, or between the two renames) so that tests can kill the process there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TextIO
from pathlib import Path

import jax
import numpy as np

from tmjax import interrupts
from tmjax.checkpoint import CONFIG_FILE, FORMAT, META_FILE, VERSION, WEIGHTS_DIR, build_manifest, check_complete
from tmjax.models.config import ModelConfig
from tmjax.models.params import param_shapes

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_PAUSE_ENV = "TMJAX_TEST_PAUSE_IN_REPLACE"
_SPARE_BYTES = 16 << 20  # orbax metadata, config and tokenizer files


def _staging_prefix(dst: Path) -> str:
    return f".{dst.name}.partial-{os.getpid()}-"


def _backup_pattern(dst: Path) -> re.Pattern:
    return re.compile(re.escape(f"{dst.name}.tmjax-backup-") + r"(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(dst: Path) -> None:
    """Delete staging folders for ``dst`` left by conversions that were killed (their pid is gone).

    A staging folder only ever holds a new, unfinished checkpoint or, after a swap, an old one whose
    replacement is already complete at ``dst``: deleting it never loses the only copy.
    """
    pattern = re.compile(re.escape(f".{dst.name}.partial-") + r"(\d+)-")
    for entry in dst.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def restore_backup(dst: Path) -> None:
    """Undo a replace that was killed half-way: put a dead run's backup back at a missing ``dst``,
    or delete it once ``dst`` is a complete checkpoint (the replace had finished)."""
    pattern = _backup_pattern(dst)
    for entry in sorted(dst.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or _pid_alive(int(match.group(1))):
            continue
        if not (dst.exists() or dst.is_symlink()):
            os.rename(entry, dst)
            print(f"tmjax convert: restored {dst} from {entry.name}, left by an interrupted replace",
                  file=sys.stderr)
        else:
            with contextlib.suppress(ValueError):
                check_complete(dst)
                shutil.rmtree(entry, ignore_errors=True)


def _check_parent(dst: Path) -> None:
    for ancestor in dst.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(f"cannot create {dst}: {ancestor} is a file, not a folder")
            return


def check_destination(dst: Path, force: bool) -> None:
    """Refuse an existing ``dst`` unless ``force``; even then, replace only an empty folder or one that
    is verifiably a complete tmjax checkpoint, so that a mistyped path cannot delete unrelated data.
    First of all, what a killed run left is dealt with: its backup put back (``restore_backup``), its
    staging folders removed."""
    _check_parent(dst)
    if dst.parent.is_dir():
        restore_backup(dst)
        _remove_stale_staging(dst)
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"destination {dst} already exists (use --force to replace a tmjax checkpoint)")
    if dst.is_dir() and not dst.is_symlink():
        if not any(dst.iterdir()):
            return
        try:
            check_complete(dst)
            return
        except ValueError as err:
            reason = str(err)
    else:
        reason = f"{dst} is not a folder"
    raise FileExistsError(f"refusing to replace {dst} even with --force, since only a complete tmjax checkpoint "
                          f"is replaced: {reason}; choose another DST or remove it yourself")


def check_free_space(dst: Path, config: ModelConfig, dtype: str) -> None:
    """Refuse up front (``OSError`` ENOSPC) when the device of ``dst`` cannot hold the weights, rather
    than fail in the middle of orbax's save."""
    needed = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(param_shapes(config, dtype)))
    existing = next(p for p in (dst.parent, *dst.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed + _SPARE_BYTES:
        raise OSError(errno.ENOSPC, f"{needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free", str(existing))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without the wrapper (glibc < 2.28)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the kernel or filesystem cannot
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _pause_for_tests() -> None:
    seconds = os.environ.get(_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def _commit(staging: Path, dst: Path) -> None:
    """Move the finished ``staging`` to ``dst``; an old ``dst`` stays recoverable until the new one is in."""
    if not dst.exists():
        os.rename(staging, dst)
        return
    if _exchange(staging, dst):
        _pause_for_tests()
        shutil.rmtree(staging, ignore_errors=True)  # now the old checkpoint
        return
    backup = dst.parent / f"{dst.name}.tmjax-backup-{os.getpid()}"
    os.rename(dst, backup)
    _pause_for_tests()
    try:
        os.rename(staging, dst)
    except BaseException:
        os.rename(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _remove_until_settled(folder: Path, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
    """Remove ``folder`` and keep removing it until it has stayed absent for ``quiet_s``.

    After a failed save, tensorstore may still finish writes orbax abandoned, and such a write creates
    its parent folders again (``.../weights.orbax-checkpoint-tmp/ocdbt.process_0/d``) after a single
    ``rmtree``. Bounded by ``limit_s``, so that a failure never hangs on it.
    """
    deadline = time.monotonic() + limit_s
    absent_since = None
    while time.monotonic() < deadline:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            absent_since = None
        elif absent_since is None:
            absent_since = time.monotonic()
        elif time.monotonic() - absent_since >= quiet_s:
            return
        time.sleep(0.05)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output(dst: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit it becomes ``dst`` (replacing an old one)."""
    dst = Path(dst).absolute()
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=dst.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the checkpoint follows the umask
        yield staging
        with interrupts.deferred(raise_at_end=False):  # the caller learns of a signal that came here
            check_destination(dst, force)  # again: something may have appeared at dst meanwhile
            _commit(staging, dst)
    except BaseException:
        _remove_until_settled(staging)
        raise


class _Shared(np.ndarray):
    """An array view whose deep copy is itself (see ``save_weights``)."""

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class _MainThreadOnly(io.TextIOBase):
    """A text stream that passes on what the main thread writes and drops the rest."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()


def save_weights(folder: Path, weights: dict) -> None:
    """Save the weight tree (numpy arrays) with orbax into ``folder/weights``, restorable by
    ``ocp.StandardCheckpointer``.

    By default orbax deep-copies host arrays (in case they change during an async save) and
    zstd-compresses them; both would double the converter's peak memory, for weights that are never
    touched again and barely compress. So the arrays go in as views that deep-copy to themselves, and
    uncompressed.

    A failed write (a full disk) is raised as ``OSError`` with its errno; orbax's per-thread error logs
    (a traceback for each writer thread) are silenced meanwhile, since the same error is raised here.
    After a failure, tensorstore's callbacks for the writes orbax abandoned print "Event loop is closed"
    tracebacks from their own threads, mixed into the one-line error: other threads' stderr stays muted.
    """
    import orbax.checkpoint as ocp  # deferred: slow to import

    shared = jax.tree.map(lambda a: np.asarray(a).view(_Shared), weights)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    orbax_log = logging.getLogger("absl")
    level = orbax_log.level
    orbax_log.setLevel(logging.CRITICAL)
    stderr = sys.stderr
    sys.stderr = _MainThreadOnly(stderr)
    try:
        with interrupts.deferred():  # orbax's writer threads must finish before anything is removed
            checkpointer.save(Path(folder).absolute() / WEIGHTS_DIR, args=ocp.args.PyTreeSave(shared))
        sys.stderr = stderr
    except ValueError as err:  # tensorstore reports an I/O failure as ValueError with the OS error code
        code = re.search(r"os_error_code='(\d+)'", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, f"{os.strerror(number)} while writing the weights", str(Path(folder).parent)) from None
    finally:
        checkpointer.close()
        orbax_log.setLevel(level)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_config(folder: Path, hf_config: dict) -> None:
    """The Hugging Face ``config.json`` the weights correspond to."""
    write_json(folder / CONFIG_FILE, hf_config)


def write_meta(folder: Path, *, dtype: str, source: str, source_format: str) -> None:
    """``tmjax.json``: written last, it marks the staging folder complete and holds the manifest of
    every file written before it."""
    write_json(
        folder / META_FILE,
        {"format": FORMAT, "version": VERSION, "dtype": dtype, "source": source, "source_format": source_format,
         "files": build_manifest(folder)},
    )
