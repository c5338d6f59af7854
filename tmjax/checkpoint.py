"""Load a checkpoint written by ``tmjax convert``: ``config.json``, ``tmjax.json`` and orbax weights.

``tmjax.json`` is written last by the converter, and the folder only appears at its final name once
complete, so a folder without a valid ``tmjax.json`` is never a checkpoint. ``tmjax.json`` also holds
the manifest: the size and xxh3-128 hash of every other file, checked by ``load`` (``verify=False``
skips the hashes) so that a damaged file is reported by name instead of changing the model.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import jax
import jax.numpy as jnp

from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes
from tmjax.models.sharding import param_shardings

FORMAT = "tmjax-checkpoint"
VERSION = 2  # 2: tmjax.json holds the manifest ("files")
META_FILE = "tmjax.json"
CONFIG_FILE = "config.json"
WEIGHTS_DIR = "weights"
DTYPES = ("bfloat16", "float32")
HASH = "xxh3_128"
# Written by orbax when a save has finished; absent from an unfinished save.
_ORBAX_DONE = "_CHECKPOINT_METADATA"
_CHUNK = 8 << 20  # bytes read at a time when hashing


def file_digest(path: Path) -> str:
    """The xxh3-128 hex digest of a file, read in chunks (constant memory)."""
    import xxhash  # deferred: only needed when writing or verifying

    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of ``folder`` except ``tmjax.json``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p != folder / META_FILE)


def build_manifest(folder: str | Path) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "xxh3_128": hex}}`` for every file but ``tmjax.json``."""
    folder = Path(folder)
    return {rel: {"size": (folder / rel).stat().st_size, HASH: file_digest(folder / rel)}
            for rel in checkpoint_files(folder)}


def _check_manifest_format(files: Any, meta_path: Path) -> None:
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{meta_path} has no file manifest ('files'); convert the source again")
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"{meta_path}: manifest entry {rel!r} points outside the checkpoint folder")
        if (not isinstance(entry, dict) or isinstance(entry.get("size"), bool)
                or not isinstance(entry.get("size"), int) or not isinstance(entry.get(HASH), str)):
            raise ValueError(f"{meta_path}: manifest entry {rel!r} needs an int 'size' and a {HASH!r} string")


def read_meta(path: str | Path) -> dict:
    """The validated ``tmjax.json`` of checkpoint folder ``path``; ``ValueError`` if it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a tmjax checkpoint folder (no such directory)")
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a complete tmjax checkpoint: {META_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ValueError(f"cannot read {meta_path}: {err.strerror or err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} does not describe a tmjax checkpoint (format != {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_path} has format version {meta.get('version')!r}; this tmjax reads {VERSION}: "
                         "convert the source again")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{meta_path} has unsupported dtype {meta.get('dtype')!r}")
    _check_manifest_format(meta.get("files"), meta_path)
    if not (folder / WEIGHTS_DIR / _ORBAX_DONE).is_file():
        raise ValueError(f"{folder / WEIGHTS_DIR} is missing or incomplete")
    return meta


def verify_files(path: str | Path, meta: dict, *, hashes: bool = True) -> None:
    """Check every file of the manifest: present, of its size and (if ``hashes``) of its hash.

    ``ValueError`` names the first file that differs.
    """
    folder = Path(path)
    for rel, entry in meta["files"].items():
        file = folder / rel
        if not file.is_file():
            raise ValueError(f"checkpoint file {file} is missing; convert the source again")
        size = file.stat().st_size
        if size != entry["size"]:
            raise ValueError(f"checkpoint file {file} has {size} bytes, the manifest says {entry['size']}: "
                             "the checkpoint is damaged; convert the source again")
    if hashes:
        for rel, entry in meta["files"].items():
            if file_digest(folder / rel) != entry[HASH]:
                raise ValueError(f"checkpoint file {folder / rel} does not match its {HASH} checksum: the "
                                 "checkpoint is damaged; convert the source again (or load with verify=False)")


def check_complete(path: str | Path) -> dict:
    """The meta of a folder that is verifiably a complete tmjax checkpoint and nothing else: valid
    ``tmjax.json`` and ``config.json``, a finished orbax tree, every manifest file present at its size,
    and no file the manifest does not list. ``ValueError`` says what is wrong. Hashes are not read."""
    folder = Path(path)
    meta = read_meta(folder)
    read_config(folder)
    verify_files(folder, meta, hashes=False)
    unlisted = sorted(set(checkpoint_files(folder)) - set(meta["files"]))
    if unlisted:
        raise ValueError(f"{folder} holds files that are not part of the checkpoint: {unlisted[:5]}")
    return meta


def read_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of checkpoint folder ``path`` (from its HF ``config.json``)."""
    config_path = Path(path) / CONFIG_FILE
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ValueError(f"cannot read {config_path}: {err.strerror or err}") from None
    try:
        return ModelConfig.from_hf(data)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None


def load(path: str | Path, *, dtype: Any = None, verify: bool = True, mesh: jax.sharding.Mesh | None = None
         ) -> Params:
    """Restore the weights of a tmjax checkpoint onto the default device, or straight into their
    shards on ``mesh`` (``tmjax.models.sharding``: no device holds a full copy).

    ``dtype`` (e.g. ``"bfloat16"``, ``jnp.float32``) casts on restore; None keeps the stored dtype.
    ``verify`` checks every file against the checksum manifest first (about one read of the
    checkpoint); ``verify=False`` checks only that the files are present at their recorded sizes.
    """
    folder = Path(path).absolute()
    meta = read_meta(folder)
    config = read_config(folder)
    target = jnp.dtype(meta["dtype"] if dtype is None else dtype)
    if not jnp.issubdtype(target, jnp.floating):
        raise ValueError(f"load dtype must be a floating type, got {target}")
    shapes = param_shapes(config, target)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, shapes) if mesh is None else param_shardings(config, mesh)
    verify_files(folder, meta, hashes=verify)
    abstract = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings)
    import orbax.checkpoint as ocp  # deferred: orbax is slow to import and only needed here

    checkpointer = ocp.StandardCheckpointer()
    try:
        mismatch = _shape_mismatch(checkpointer.metadata(folder / WEIGHTS_DIR).item_metadata, abstract)
        if mismatch is None:
            weights = checkpointer.restore(folder / WEIGHTS_DIR, abstract)
    except Exception as err:  # orbax raises a bare Exception for a failed array read
        raise ValueError(f"cannot restore {folder / WEIGHTS_DIR}: {str(err).splitlines()[0]}") from None
    finally:
        checkpointer.close()
    if mismatch is not None:
        raise ValueError(f"cannot restore {folder / WEIGHTS_DIR}: {mismatch}")
    return Params(config, weights)


def _shape_mismatch(stored: Any, expected: Any) -> str | None:
    """How the stored weight tree differs from the one ``config.json`` implies, or None.

    Checked from orbax's metadata before any array is read: a restore that fails part-way leaves
    reads in flight, which report errors later (even after the files are gone or at exit).
    """
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    have, want = shapes(stored), shapes(expected)
    if have.keys() != want.keys():
        return (f"its weights {sorted(have.keys() ^ want.keys())[:5]} do not match the model of {CONFIG_FILE} "
                "(missing or extra)")
    for name, shape in want.items():
        if have[name] != shape:
            return f"weight {name!r} has shape {have[name]} but {CONFIG_FILE} implies {shape}"
    return None


def tokenizer(path: str | Path) -> Any:
    """The transformers tokenizer saved in checkpoint folder ``path`` (offline)."""
    folder = Path(path)
    read_meta(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} holds no tokenizer files")
    from transformers import AutoTokenizer  # deferred: transformers is an optional dependency

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
