"""Lazy reads of one or many safetensors files: one tensor in host memory at a time, no torch.

Tensors come back as NumPy arrays (bfloat16 through ml_dtypes) from safetensors' numpy framework,
which memory-maps the file, so a 24 GB checkpoint is never held whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from convert.errors import CheckpointError


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


class SafetensorsFiles:
    """The tensors of a checkpoint split over any number of safetensors files, read on demand."""

    def __init__(self, files: list[Path], *, name: str | None = None):
        if not files:
            raise CheckpointError(f"{name or 'checkpoint'}: no safetensors files")
        self.name = name or str(files[0])
        self._handles = {}
        self._where: dict[str, Path] = {}
        for path in files:
            handle = _open(path)
            self._handles[path] = handle
            for key in handle.keys():
                if key in self._where:
                    raise CheckpointError(f"{path}: key {key!r} is also in {self._where[key]}")
                self._where[key] = path

    @classmethod
    def from_index(cls, index_path: Path) -> SafetensorsFiles:
        """Shards listed by a `*.safetensors.index.json` weight map; every listed shard must exist."""
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from None
        for shard in shards:
            if not (index_path.parent / shard).is_file():
                raise CheckpointError(f"{index_path}: shard {shard!r} listed in the index is missing")
        files = cls([index_path.parent / s for s in shards], name=str(index_path.parent))
        for key, shard in weight_map.items():
            if files._where.get(key) != index_path.parent / shard:
                raise CheckpointError(f"{index_path}: key {key!r} is listed in {shard!r} but not stored there")
        return files

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """safetensors' dtype tag, e.g. "BF16", "F32"."""
        return self._handles[self._where[key]].get_slice(key).get_dtype()

    def read(self, key: str) -> np.ndarray:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except KeyError:
            raise CheckpointError(f"{self.name}: missing key {key!r}") from None
        except SafetensorError as err:
            raise CheckpointError(f"{self._where[key]}: cannot read tensor {key!r} ({err})") from None
