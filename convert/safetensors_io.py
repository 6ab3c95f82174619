"""Lazy reads of one or many safetensors files: one tensor in host memory at a time, no torch.

Tensors come back as NumPy arrays (bfloat16 through ml_dtypes) from safetensors' numpy framework,
which memory-maps the file, so a 24 GB checkpoint is never held whole. `StoredTensor` goes further:
one of our leaves as a region reader over its source tensors, so that on a mesh each host reads
only the slices its devices hold (`flux_jax.params.fill`).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy: safetensors' numpy reads need it)
import numpy as np
from safetensors import SafetensorError, safe_open

from flux_jax.io.errors import CheckpointError
from flux_jax.params import Index, LazyTensor, whole


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

    def read(self, key: str, index: Index | None = None) -> np.ndarray:
        """Tensor `key`, or only its region `index` (slices with concrete bounds, step 1; reads just
        those bytes)."""
        try:
            # A handle of its own, dropped after the read: pages of the memory-mapped file that a read
            # touched count in the process's resident memory for as long as a handle maps them, which
            # over a whole checkpoint added its file size to the loader's peak.
            handle = _open(self._where[key])
            if index is None or index == whole(self.shape(key)):
                return handle.get_tensor(key)
            return handle.get_slice(key)[index]
        except KeyError:
            raise CheckpointError(f"{self.name}: missing key {key!r}") from None
        except SafetensorError as err:
            raise CheckpointError(f"{self._where[key]}: cannot read tensor {key!r} ({err})") from None


class StoredTensor(LazyTensor):
    """A leaf as stored: `keys` concatenated along axis 0, the two halves of that axis swapped if
    `swap_halves`, then axes permuted by `axes` (None: as stored). `read(index)` reads from disk only
    the parts of the source tensors that make up that region of the result.

    The source shapes must fit together (callers check them from the headers, naming the tensors)."""

    def __init__(self, files: SafetensorsFiles, keys: tuple[str, ...], *, swap_halves: bool = False,
                 axes: tuple[int, ...] | None = None):
        shapes = [files.shape(k) for k in keys]
        self.stored_shape = shapes[0] if len(keys) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
        self.axes = axes
        self.shape = tuple(self.stored_shape[a] for a in axes) if axes is not None else self.stored_shape
        self._files, self._keys = files, keys
        # Axis 0 of the stored value as (key, start, stop) runs of source rows, in order.
        segments = [(k, 0, s[0]) for k, s in zip(keys, shapes)] if self.stored_shape else []
        if swap_halves:
            segments = _rotate(segments, self.stored_shape[0] // 2)
        self._segments = segments

    def read(self, index: Index) -> np.ndarray:
        if not self.stored_shape:
            return self._files.read(self._keys[0])
        stored = list(index)
        if self.axes is not None:
            for ours, theirs in enumerate(self.axes):
                stored[theirs] = index[ours]
        rows, rest = stored[0], tuple(stored[1:])
        pieces, offset = [], 0
        for key, start, stop in self._segments:
            lo, hi = max(rows.start, offset), min(rows.stop, offset + stop - start)
            if lo < hi:
                pieces.append(self._files.read(key, (slice(start + lo - offset, start + hi - offset), *rest)))
            offset += stop - start
        if not pieces:  # an empty region
            pieces = [self._files.read(self._keys[0], (slice(0, 0), *rest))]
        value = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
        return value.transpose(self.axes) if self.axes is not None else value


def _rotate(segments: list[tuple[str, int, int]], by: int) -> list[tuple[str, int, int]]:
    """Runs of rows starting `by` rows in, wrapping around: (b, a) for rows split as (a, b)."""
    head, tail, offset = [], [], 0
    for key, start, stop in segments:
        cut = min(max(by - offset, 0), stop - start)
        if cut:
            head.append((key, start, start + cut))
        if start + cut < stop:
            tail.append((key, start + cut, stop))
        offset += stop - start
    return tail + head
