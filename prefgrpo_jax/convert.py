"""Safetensors -> Flax NNX state, with every key and shape checked.

The generic half of weight conversion. Each model module provides a *mapping*
function ``map_<format>(src: SourceTensors, cfg) -> TensorMap`` that renames,
transposes and stacks source tensors into our NNX state paths; this module
reads the files, runs the mapping, and checks the result against
``nnx.eval_shape`` of the model. A missing, unexpected or mis-shaped tensor is
collected, and all offenders are raised together in one ``WeightMismatchError``.

Target keys are NNX state paths joined with ``.`` (e.g.
``double_blocks.img_attn.qkv.kernel``); stacked (scanned) layers carry the
layer index as the leading axis of the array, not in the key.

Source tensors are lazy (``lazy_tensors``): a mapping's transposes, stacks and
concatenations are views, and ``build_model`` with ``shardings`` reads, for
each device, only the box of each parameter that device holds.

Never pickle: only ``*.safetensors`` files are read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax import lazy_tensors
from prefgrpo_jax.lazy_tensors import LazyTensor, WeightFileError

# target key -> (source name, array). The source name is kept so errors name the
# tensor the user actually has in their checkpoint.
TensorMap = dict[str, tuple[str, LazyTensor]]
# A source tensor: lazy (read from a file on demand) or already in memory.
Tensor = LazyTensor | np.ndarray
# (dotted parameter key, shape) -> where that parameter lives.
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]
M = TypeVar("M", bound=nnx.Module)


class WeightMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every offending tensor."""


class SourceTensors:
    """Source tensors with bookkeeping of which were used and which were missing.

    Mapping functions call ``take``/``maybe``; whatever is never taken is
    reported as unexpected, whatever was asked for but absent as missing.
    """

    def __init__(self, tensors: dict[str, Tensor], origin: str = "checkpoint"):
        self._tensors = dict(tensors)
        self._used: set[str] = set()
        self.missing: list[str] = []
        self.inconsistent: list[str] = []  # layers whose shape differs from layer 0
        self.origin = origin

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def take(self, name: str) -> LazyTensor | None:
        """Returns the tensor ``name`` (recording its use) or records it missing."""
        if name not in self._tensors:
            self.missing.append(name)
            return None
        self._used.add(name)
        return lazy_tensors.as_lazy(self._tensors[name])

    def maybe(self, name: str) -> LazyTensor | None:
        """Like ``take`` but an absent tensor is not an error (optional weights)."""
        if name not in self._tensors:
            return None
        return self.take(name)

    def unused(self) -> list[str]:
        return sorted(set(self._tensors) - self._used)


def stack_layers(
    src: SourceTensors,
    name_fmt: str,
    n: int,
    transform: Callable[[LazyTensor], LazyTensor] = lambda a: a,
) -> tuple[str, LazyTensor] | None:
    """Stacks ``name_fmt.format(i)`` for i < n along a new leading axis.

    Returns ``(source pattern, array [n, ...])`` or None if any layer is missing
    (the missing names are recorded in ``src``).
    """
    arrays = [src.take(name_fmt.format(i)) for i in range(n)]
    if any(a is None for a in arrays):
        return None
    arrays = [transform(a) for a in arrays]
    odd = [i for i, a in enumerate(arrays) if a.shape != arrays[0].shape]
    if odd:
        src.inconsistent.extend(
            f"{name_fmt.format(i)} has {arrays[i].shape}, layer 0 has {arrays[0].shape}"
            for i in odd
        )
        return None
    return name_fmt.format("*"), lazy_tensors.stack(arrays)


def put(out: TensorMap, target: str, source: str, array: Tensor | None) -> None:
    """Adds ``target <- array`` unless the source was missing (already recorded)."""
    if array is not None:
        out[target] = (source, lazy_tensors.as_lazy(array))


def put_stacked(out: TensorMap, target: str, stacked: tuple[str, LazyTensor] | None) -> None:
    if stacked is not None:
        out[target] = stacked


def linear_kernel(w: Tensor) -> LazyTensor:
    """torch Linear weight [out, in] -> Flax kernel [in, out]."""
    return lazy_tensors.transpose(w, (1, 0))


def conv_kernel(w: Tensor) -> LazyTensor:
    """torch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return lazy_tensors.transpose(w, (2, 3, 1, 0))


# ---------------------------------------------------------------------------
# Reading safetensors files.

_SINGLE_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of :func:`open_safetensors` read into memory (small files, tests)."""
    return {name: tensor.read() for name, tensor in open_safetensors(path).items()}


def open_safetensors(path: str | Path) -> dict[str, LazyTensor]:
    """Lazy views of a ``.safetensors`` file, a sharded checkpoint or a component dir.

    Args:
      path: a ``*.safetensors`` file; a ``*.safetensors.index.json`` file; or a
        directory holding one of those (diffusers/transformers
        ``save_pretrained`` layout).

    Returns:
      name -> lazy tensor; nothing but the headers is read until a box of one is
      (bf16 tensors come back as ``ml_dtypes.bfloat16``).

    Raises:
      FileNotFoundError: naming what was expected where.
      WeightFileError: a truncated, garbled or unreadable file, named.
    """
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return _read_sharded(indexes[0])
        for name in _SINGLE_FILE_NAMES:
            if (path / name).is_file():
                return _open_file(path / name)
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _open_file(files[0])
        if not files:
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(
                p.name for p in path.glob("*.pt*")
            )
            hint = (
                f" Found pickle files {pickled}, which are never loaded; convert them "
                "with `save_pretrained(..., safe_serialization=True)`." if pickled else ""
            )
            raise FileNotFoundError(
                f"No safetensors weights in {path}: expected one of "
                f"{list(_SINGLE_FILE_NAMES)} or a '*.safetensors.index.json' with its "
                f"shards.{hint}"
            )
        raise FileNotFoundError(
            f"{path} holds several .safetensors files ({[f.name for f in files]}) but "
            "no '*.safetensors.index.json' saying how they fit together."
        )
    if path.name.endswith(".safetensors.index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"Weights file {path} does not exist.")
        return _open_file(path)
    raise FileNotFoundError(
        f"{path} is neither a directory, a .safetensors file nor a "
        "*.safetensors.index.json; only safetensors weights are supported."
    )


def _open_file(path: Path) -> dict[str, LazyTensor]:
    """The header's lazy views; every box read later is checked for NaN/Inf."""
    try:
        return dict(lazy_tensors.SafetensorsFile(path).tensors)
    except OSError as err:
        raise WeightFileError(f"cannot read weights file {path}: {err}") from None


def _read_sharded(index_path: Path) -> dict[str, LazyTensor]:
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = index.get("weight_map", {})
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_path} lists shards that do not exist: {missing} (in "
            f"{index_path.parent}). Re-download or re-save the checkpoint."
        )
    tensors: dict[str, LazyTensor] = {}
    for shard in shards:
        tensors.update(_open_file(index_path.parent / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise FileNotFoundError(
            f"{index_path} maps tensors that are not in their shards: {absent[:20]}"
        )
    return tensors


# ---------------------------------------------------------------------------
# Building a model from mapped tensors.


def _flat_abstract_state(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    _, state = nnx.split(model)
    return {
        ".".join(str(p) for p in path): leaf
        for path, leaf in nnx.to_flat_state(state)
    }


def check_mapping(
    abstract: dict[str, jax.ShapeDtypeStruct], mapped: TensorMap, src: SourceTensors
) -> None:
    """Raises one WeightMismatchError listing every offending tensor."""
    problems: list[str] = []
    for name in sorted(set(src.missing)):
        problems.append(f"missing in {src.origin}: {name}")
    for line in src.inconsistent:
        problems.append(f"shape mismatch between layers: {line}")
    for name in sorted(set(abstract) - set(mapped)):
        problems.append(f"no tensor for model parameter: {name}")
    for name in src.unused():
        problems.append(f"unexpected tensor in {src.origin}: {name}")
    for name in sorted(set(mapped) - set(abstract)):
        problems.append(f"unexpected tensor (no such parameter): {mapped[name][0]} -> {name}")
    for name in sorted(set(mapped) & set(abstract)):
        source, array = mapped[name]
        want = tuple(abstract[name].shape)
        if tuple(array.shape) != want:
            problems.append(
                f"shape mismatch: {source} has {tuple(array.shape)}, model parameter "
                f"{name} needs {want}"
            )
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise WeightMismatchError(
            f"{len(problems)} problem(s) loading {src.origin} (does the config match "
            "the checkpoint?):\n  " + "\n  ".join(shown) + more
        )


def build_model(
    factory: Callable[[], M],
    mapped: TensorMap,
    src: SourceTensors,
    *,
    dtype: jnp.dtype | None = None,
    shardings: ShardingFn | None = None,
) -> M:
    """Builds ``factory()`` with the mapped tensors after checking them all.

    Args:
      factory: zero-argument callable creating the model (traced abstractly
        with ``nnx.eval_shape``; no random init is computed).
      mapped: output of a model's mapping function.
      src: the source tensors the mapping consumed (for missing/unused checks).
      dtype: optional cast of every floating parameter (e.g. ``jnp.bfloat16``);
        by default the checkpoint's floating tensors are cast to the model's
        parameter dtype (fp32).
      shardings: ``(dotted parameter key, shape) -> sharding``. Each parameter
        is then born with it: every device's box is read from the files and cast on the host
        (``jax.make_array_from_callback``), so no device or host ever holds a
        full-size copy of a sharded parameter. Without it, parameters go to
        the default device.
    """
    abstract_model = nnx.eval_shape(factory)
    abstract = _flat_abstract_state(abstract_model)
    check_mapping(abstract, mapped, src)
    graphdef, abstract_state = nnx.split(abstract_model)
    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        key = ".".join(str(p) for p in path)
        tensor = mapped[key][1]
        target = np.dtype(dtype if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating)
                          else leaf.dtype)
        if shardings is None:
            return jnp.asarray(tensor.read().astype(target, copy=False))
        return load_sharded(tensor, shardings(key, tuple(leaf.shape)), target)

    state = nnx.from_flat_state(
        [(path, leaf.replace(fill(path, leaf))) for path, leaf in nnx.to_flat_state(abstract_state)]
    )
    return nnx.merge(graphdef, state)


def load_sharded(tensor: LazyTensor, sharding: jax.sharding.Sharding, dtype: np.dtype) -> jax.Array:
    """``tensor`` as a global array with ``sharding``; each addressable box is read once.

    Replicated boxes (several local devices holding the same index) share one read.
    """
    cache: dict[tuple, np.ndarray] = {}

    def box(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in lazy_tensors.normalize_index(index, tensor.shape))
        if key not in cache:
            cache[key] = tensor.read(index).astype(dtype, copy=False)
        return cache[key]

    return jax.make_array_from_callback(tuple(tensor.shape), sharding, box)


def load_model(
    factory: Callable[[], M],
    mapping: Callable[[SourceTensors], TensorMap],
    tensors: Mapping[str, Tensor],
    *,
    origin: str,
    dtype: jnp.dtype | None = None,
    shardings: ShardingFn | None = None,
) -> M:
    """Maps ``tensors`` with ``mapping`` and builds the checked model."""
    src = SourceTensors(dict(tensors), origin=origin)
    mapped = mapping(src)
    return build_model(factory, mapped, src, dtype=dtype, shardings=shardings)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Model parameters as ``{dotted path: array}`` (for tests and export)."""
    _, state = nnx.split(model, nnx.Param)
    return {
        ".".join(str(p) for p in path): np.asarray(leaf.get_value())
        for path, leaf in nnx.to_flat_state(state)
    }

