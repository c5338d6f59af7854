"""Load a checkpoint written by ``tmjax convert``: ``config.json``, ``tmjax.json`` and orbax weights.

``tmjax.json`` is written last by the converter, and the folder only appears at its final name once
complete, so a folder without a valid ``tmjax.json`` is never a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tmjax.models.config import ModelConfig
from tmjax.models.params import Params, param_shapes
from tmjax.models.sharding import param_shardings

FORMAT = "tmjax-checkpoint"
VERSION = 1
META_FILE = "tmjax.json"
CONFIG_FILE = "config.json"
WEIGHTS_DIR = "weights"
DTYPES = ("bfloat16", "float32")
# Written by orbax when a save has finished; absent from an unfinished save.
_ORBAX_DONE = "_CHECKPOINT_METADATA"


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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} does not describe a tmjax checkpoint (format != {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_path} has format version {meta.get('version')!r}; this tmjax reads {VERSION}")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{meta_path} has unsupported dtype {meta.get('dtype')!r}")
    if not (folder / WEIGHTS_DIR / _ORBAX_DONE).is_file():
        raise ValueError(f"{folder / WEIGHTS_DIR} is missing or incomplete")
    return meta


def read_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of checkpoint folder ``path`` (from its HF ``config.json``)."""
    config_path = Path(path) / CONFIG_FILE
    try:
        return ModelConfig.from_hf(json.loads(config_path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{config_path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None


def load(path: str | Path, *, dtype: Any = None, mesh: jax.sharding.Mesh | None = None) -> Params:
    """Restore the weights of a tmjax checkpoint onto the default device, or straight into their
    shards on ``mesh`` (``tmjax.models.sharding``: no device holds a full copy).

    ``dtype`` (e.g. ``"bfloat16"``, ``jnp.float32``) casts on restore; None keeps the stored dtype.
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
    abstract = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings)
    import orbax.checkpoint as ocp  # deferred: orbax is slow to import and only needed here

    checkpointer = ocp.StandardCheckpointer()
    try:
        weights = checkpointer.restore(folder / WEIGHTS_DIR, abstract)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise ValueError(f"cannot restore {folder / WEIGHTS_DIR}: {err}") from None
    finally:
        checkpointer.close()
    return Params(config, weights)


def tokenizer(path: str | Path) -> Any:
    """The transformers tokenizer saved in checkpoint folder ``path`` (offline)."""
    folder = Path(path)
    read_meta(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} holds no tokenizer files")
    from transformers import AutoTokenizer  # deferred: transformers is an optional dependency

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
