"""Read a Hugging Face model folder (``config.json`` + one or several safetensors shards) lazily.

Every shard header is opened and checked up front, so a missing, truncated or corrupt file is
reported before anything is written; tensors are then read one at a time on demand.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return it)
import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files copied verbatim beside the converted weights (tokenizer, chat template, generation defaults).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:  # unreadable (permissions, a folder of that name): not "missing"
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None


class SafetensorsSource(contextlib.AbstractContextManager):
    """An HF folder: its ``config.json`` dict and a name -> numpy array lookup over its shards."""

    FORMAT = "safetensors"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.hf_config: dict = _read_json(self.folder / "config.json")
        self._where: dict[str, Path] = {}  # tensor name -> shard file
        self._index: dict[str, str] | None = None  # weight_map of a sharded checkpoint
        self._open_shards()

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map' object (tensor name -> shard file name)")
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                    raise ValueError(f"{index} maps tensor {name!r} to {shard!r}; each entry must be the file "
                                     f"name of a shard inside {self.folder}")
            self._index = weight_map
            return [self.folder / f for f in sorted(set(weight_map.values()))]
        if (self.folder / SINGLE).is_file():
            return [self.folder / SINGLE]
        raise ValueError(f"{self.folder} has neither {SINGLE} nor {INDEX}")

    def _open_shards(self) -> None:
        for path in self._shard_files():
            if not path.is_file():
                raise ValueError(f"shard {path} named in {INDEX} is missing")
            with self._open(path) as handle:  # reads and checks the header, then closes
                names = handle.keys()
            for name in names:
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in more than one shard ({path})")
                self._where[name] = path
        if self._index is not None:
            for name, shard in self._index.items():
                found = self._where.get(name)
                if found is None or found.name != shard:
                    raise ValueError(f"{INDEX} puts tensor {name!r} in {shard}, which lacks it")

    @staticmethod
    def _open(path: Path) -> Any:
        try:  # safetensors reports every failure to open (permissions included) as "No such file"
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
        try:
            return safe_open(str(path), framework="numpy")
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._where)

    def get_tensor(self, name: str) -> np.ndarray:
        """One tensor as a numpy array; ``KeyError`` if absent, ``ValueError`` if unreadable.

        The shard is memory-mapped only for this read: a mapping kept open would keep every page
        read so far resident (and counted in the process's RSS) until the end.
        """
        path = self._where[name]
        try:
            with self._open(path) as handle:
                return handle.get_tensor(name)
        except (SafetensorError, TypeError) as err:
            raise ValueError(f"cannot read tensor {name!r} from {path}: {err}") from None

    def write_side_files(self, folder: Path) -> None:
        """Copy the tokenizer, chat template and generation files present in the source folder."""
        for name in SIDE_FILES:
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, folder / name)  # new file: mode from the umask

    def __exit__(self, *exc: object) -> None:
        """Nothing to release: shards are only open during a read."""
