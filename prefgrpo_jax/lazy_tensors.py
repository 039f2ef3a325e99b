"""Safetensors tensors read lazily, by slice, through the renames of a weight mapping.

FLUX.1-dev's transformer is 22 GiB in bf16 and its fp32 master copy 44 GiB: no
host or device may hold it whole. A weight mapping (``models/*.map_*``) turns
checkpoint tensors into our layout with a handful of operations (transpose,
stack layers, concatenate q/k/v, swap halves). Here each of those is a *view*
that knows its shape and reads, for any box of indices, only the bytes of the
source tensors that box covers. ``jax.make_array_from_callback`` then asks each
device's box of each parameter: every host reads only the slices its own
devices hold, and no full-size array is ever built.

Files are memory-mapped from their header's offsets (the safetensors format is
an 8-byte header length, a JSON header, then raw little-endian data), which
also reads bf16 (``safetensors.numpy`` cannot) and names a truncated file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

Index = tuple[slice, ...]

# safetensors dtype names -> NumPy dtypes (bf16 and fp8 through ml_dtypes).
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightFileError(ValueError):
    """A weights file is unreadable (truncated, corrupt) or holds NaN/Inf values."""


def non_finite(name: str, array: np.ndarray) -> str | None:
    """None if ``array`` is finite (or not floating), else a line naming tensor and count.

    A NaN/Inf weight makes every sample NaN and every update skipped, so a run
    would end "successfully" exporting garbage: it is refused where it is read.
    """
    if array.dtype.kind in "biu":  # bool/int cannot be non-finite (ml_dtypes floats are kind "V")
        return None
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad == 0:
        return None
    return f"{name} {tuple(array.shape)}: {bad} non-finite value(s) of {array.size}"


def normalize_index(index: Index | None, shape: tuple[int, ...]) -> Index:
    """A box ``(slice, ...)`` with explicit, step-1 bounds for every dimension."""
    if index is None:
        index = ()
    if len(index) > len(shape):
        raise IndexError(f"index {index} has more entries than shape {shape}")
    out = []
    for dim, s in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index))):
        if not isinstance(s, slice):
            raise TypeError(f"lazy tensors take slices only, got {s!r}")
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"lazy tensors take step-1 slices only, got {s!r}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class LazyTensor:
    """A tensor of known ``shape``/``dtype`` whose boxes are read on demand.

    ``read(index)`` returns the box ``index`` (a tuple of step-1 slices, one per
    dimension) as a NumPy array; ``np.asarray(t)`` reads all of it.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: Index | None = None) -> np.ndarray:
        return self._read(normalize_index(index, self.shape))

    def _read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def T(self) -> "LazyTensor":
        return transpose(self, tuple(reversed(range(self.ndim))))

    def __getitem__(self, index) -> "LazyTensor":
        if not isinstance(index, tuple):
            index = (index,)
        if not all(isinstance(i, slice) for i in index):
            # Integer/fancy indexing (rare: old 1x1-conv checkpoints) reads the tensor.
            return InMemory(np.asarray(self)[index])
        return _Sliced(self, normalize_index(index, self.shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name})"


class FileTensor(LazyTensor):
    """One tensor of a safetensors file, memory-mapped."""

    def __init__(self, file: "SafetensorsFile", name: str, dtype: np.dtype,
                 shape: tuple[int, ...], offset: int):
        self.file, self.name, self.dtype, self.shape, self.offset = file, name, np.dtype(dtype), shape, offset

    def _read(self, index: Index) -> np.ndarray:
        full = np.ndarray(self.shape, self.dtype, buffer=self.file.buffer(), offset=self.offset)
        box = np.array(full[index])  # copies just the box out of the mapping
        line = non_finite(self.name, box)
        if line:
            where = "" if box.shape == self.shape else f" (the slice {index} of {self.shape})"
            raise WeightFileError(
                f"weights file {self.file.path} holds non-finite tensors (training from them gives NaN "
                f"samples and skipped updates):\n  {line}{where}")
        return box


class _Truncated(Exception):
    pass


def _unreadable(path: Path, detail: object) -> str:
    return (f"cannot read weights file {path}: {detail}. The file is truncated or corrupt (a cut-off "
            "download or a full disk?): download or save it again")


class SafetensorsFile:
    """The header of a ``.safetensors`` file and lazy views of its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap: np.memmap | None = None
        size = self.path.stat().st_size
        try:
            with self.path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise _Truncated(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(f.read(header_len))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, _Truncated) as err:
            raise WeightFileError(_unreadable(self.path, err)) from None
        self.metadata = header.pop("__metadata__", {}) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, FileTensor] = {}
        end = data_start
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise WeightFileError(f"weights file {self.path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            dtype = np.dtype(DTYPES[info["dtype"]])
            if stop - begin != math.prod(shape) * dtype.itemsize:
                raise WeightFileError(_unreadable(self.path, f"tensor {name}'s byte range does not match {shape} {dtype}"))
            self.tensors[name] = FileTensor(self, name, dtype, shape, data_start + begin)
            end = max(end, data_start + stop)
        if end > size:
            raise WeightFileError(_unreadable(self.path, f"its header needs {end} bytes, the file has {size}"))

    def buffer(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap


class InMemory(LazyTensor):
    """A NumPy array behind the lazy interface (tests, in-memory state dicts)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)
        self.shape, self.dtype = self.array.shape, self.array.dtype

    def _read(self, index: Index) -> np.ndarray:
        return self.array[index]


def as_lazy(a: LazyTensor | np.ndarray) -> LazyTensor:
    return a if isinstance(a, LazyTensor) else InMemory(a)


class _Sliced(LazyTensor):
    def __init__(self, base: LazyTensor, box: Index):
        self.base, self.box = base, box
        self.shape = tuple(s.stop - s.start for s in box)
        self.dtype = base.dtype

    def _read(self, index: Index) -> np.ndarray:
        return self.base.read(tuple(
            slice(b.start + i.start, b.start + i.stop) for b, i in zip(self.box, index)))


class _Transposed(LazyTensor):
    def __init__(self, base: LazyTensor, perm: tuple[int, ...]):
        self.base, self.perm = base, perm
        self.shape = tuple(base.shape[p] for p in perm)
        self.dtype = base.dtype

    def _read(self, index: Index) -> np.ndarray:
        src = [slice(None)] * len(self.perm)
        for out_dim, in_dim in enumerate(self.perm):
            src[in_dim] = index[out_dim]
        return np.ascontiguousarray(self.base.read(tuple(src)).transpose(self.perm))


class _Concatenated(LazyTensor):
    def __init__(self, parts: Sequence[LazyTensor], axis: int):
        self.parts, self.axis = list(parts), axis
        self.shape = tuple(sum(p.shape[axis] for p in parts) if d == axis else n
                           for d, n in enumerate(parts[0].shape))
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def _read(self, index: Index) -> np.ndarray:
        want, pieces, start = index[self.axis], [], 0
        for part in self.parts:
            stop = start + part.shape[self.axis]
            lo, hi = max(want.start, start), min(want.stop, stop)
            if lo < hi:
                sub = list(index)
                sub[self.axis] = slice(lo - start, hi - start)
                pieces.append(part.read(tuple(sub)).astype(self.dtype, copy=False))
            start = stop
        if not pieces:
            return np.empty(tuple(s.stop - s.start for s in index), self.dtype)
        return np.concatenate(pieces, axis=self.axis)


class _Stacked(LazyTensor):
    def __init__(self, parts: Sequence[LazyTensor]):
        self.parts = list(parts)
        self.shape = (len(parts),) + tuple(parts[0].shape)
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def _read(self, index: Index) -> np.ndarray:
        layers = [self.parts[i].read(index[1:]).astype(self.dtype, copy=False)
                  for i in range(index[0].start, index[0].stop)]
        if not layers:
            return np.empty(tuple(s.stop - s.start for s in index), self.dtype)
        return np.stack(layers)


def transpose(a: LazyTensor | np.ndarray, perm: Sequence[int]) -> LazyTensor:
    a = as_lazy(a)
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != list(range(a.ndim)):
        raise ValueError(f"{perm} is not a permutation of {a.ndim} axes")
    return _Transposed(a, perm)


def concatenate(parts: Sequence[LazyTensor | np.ndarray], axis: int = 0) -> LazyTensor:
    parts = [as_lazy(p) for p in parts]
    axis = axis % parts[0].ndim
    for p in parts[1:]:
        if p.ndim != parts[0].ndim or any(
                n != m for d, (n, m) in enumerate(zip(p.shape, parts[0].shape)) if d != axis):
            raise ValueError(f"cannot concatenate {[q.shape for q in parts]} along axis {axis}")
    return _Concatenated(parts, axis)


def stack(parts: Sequence[LazyTensor | np.ndarray]) -> LazyTensor:
    parts = [as_lazy(p) for p in parts]
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"cannot stack {[p.shape for p in parts]}")
    return _Stacked(parts)
