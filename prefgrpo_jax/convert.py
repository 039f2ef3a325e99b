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

Never pickle: only ``*.safetensors`` files are read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

# target key -> (source name, array). The source name is kept so errors name the
# tensor the user actually has in their checkpoint.
TensorMap = dict[str, tuple[str, np.ndarray]]
M = TypeVar("M", bound=nnx.Module)


class WeightMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every offending tensor."""


class WeightFileError(ValueError):
    """A weights file is unreadable (truncated, corrupt) or holds NaN/Inf values."""


def check_finite(name: str, array: np.ndarray) -> str | None:
    """None if ``array`` is finite (or not floating), else a line naming tensor and count.

    A NaN/Inf weight makes every sample NaN and every update skipped, so a run
    would end "successfully" exporting garbage; it is refused where it is read.
    """
    if array.dtype.kind in "biu":  # bool/int tensors cannot be non-finite (ml_dtypes floats are kind "V")
        return None
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad == 0:
        return None
    return f"{name} {tuple(array.shape)}: {bad} non-finite value(s) of {array.size}"


def load_checked(path: str | Path) -> dict[str, np.ndarray]:
    """One ``.safetensors`` file, every floating tensor checked for NaN/Inf.

    Raises:
      WeightFileError naming the file: unreadable (e.g. truncated by a cut-off
      download or a full disk) or holding non-finite tensors (each one named).
    """
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors
        raise WeightFileError(
            f"cannot read weights file {path}: {type(err).__name__}: {err}. The file is truncated "
            "or corrupt (a cut-off download or a full disk?): download or save it again"
        ) from None
    bad = [line for name, array in tensors.items() if (line := check_finite(name, array))]
    if bad:
        raise WeightFileError(
            f"weights file {path} holds non-finite tensors (training from them gives NaN samples "
            "and skipped updates):\n  " + "\n  ".join(bad[:20])
            + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        )
    return tensors


class SourceTensors:
    """Source tensors with bookkeeping of which were used and which were missing.

    Mapping functions call ``take``/``maybe``; whatever is never taken is
    reported as unexpected, whatever was asked for but absent as missing.
    """

    def __init__(self, tensors: dict[str, np.ndarray], origin: str = "checkpoint"):
        self._tensors = dict(tensors)
        self._used: set[str] = set()
        self.missing: list[str] = []
        self.inconsistent: list[str] = []  # layers whose shape differs from layer 0
        self.origin = origin

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def take(self, name: str) -> np.ndarray | None:
        """Returns the tensor ``name`` (recording its use) or records it missing."""
        if name not in self._tensors:
            self.missing.append(name)
            return None
        self._used.add(name)
        return self._tensors[name]

    def maybe(self, name: str) -> np.ndarray | None:
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
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a,
) -> tuple[str, np.ndarray] | None:
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
    return name_fmt.format("*"), np.stack(arrays)


def put(out: TensorMap, target: str, source: str, array: np.ndarray | None) -> None:
    """Adds ``target <- array`` unless the source was missing (already recorded)."""
    if array is not None:
        out[target] = (source, array)


def put_stacked(out: TensorMap, target: str, stacked: tuple[str, np.ndarray] | None) -> None:
    if stacked is not None:
        out[target] = stacked


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


# ---------------------------------------------------------------------------
# Reading safetensors files.

_SINGLE_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file, a sharded checkpoint or a component dir.

    Args:
      path: a ``*.safetensors`` file; a ``*.safetensors.index.json`` file; or a
        directory holding one of those (diffusers/transformers
        ``save_pretrained`` layout).

    Returns:
      name -> numpy array (bf16 tensors come back as ``ml_dtypes.bfloat16``).

    Raises:
      FileNotFoundError: naming what was expected where.
      WeightFileError: a file is unreadable or holds NaN/Inf (naming file and tensors).
    """
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return _read_sharded(indexes[0])
        for name in _SINGLE_FILE_NAMES:
            if (path / name).is_file():
                return load_checked(path / name)
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return load_checked(files[0])
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
        return load_checked(path)
    raise FileNotFoundError(
        f"{path} is neither a directory, a .safetensors file nor a "
        "*.safetensors.index.json; only safetensors weights are supported."
    )


def _read_sharded(index_path: Path) -> dict[str, np.ndarray]:
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = index.get("weight_map", {})
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_path} lists shards that do not exist: {missing} (in "
            f"{index_path.parent}). Re-download or re-save the checkpoint."
        )
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(load_checked(index_path.parent / shard))
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
    """
    abstract_model = nnx.eval_shape(factory)
    abstract = _flat_abstract_state(abstract_model)
    check_mapping(abstract, mapped, src)
    graphdef, abstract_state = nnx.split(abstract_model)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        key = ".".join(str(p) for p in path)
        array = mapped[key][1]
        target = dtype if dtype is not None else leaf.dtype
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(array, dtype=target)
        return jnp.asarray(array, dtype=leaf.dtype)

    state = nnx.from_flat_state(
        [(path, leaf.replace(fill(path, leaf))) for path, leaf in nnx.to_flat_state(abstract_state)]
    )
    return nnx.merge(graphdef, state)


def load_model(
    factory: Callable[[], M],
    mapping: Callable[[SourceTensors], TensorMap],
    tensors: dict[str, np.ndarray],
    *,
    origin: str,
    dtype: jnp.dtype | None = None,
) -> M:
    """Maps ``tensors`` with ``mapping`` and builds the checked model."""
    src = SourceTensors(tensors, origin=origin)
    mapped = mapping(src)
    return build_model(factory, mapped, src, dtype=dtype)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Model parameters as ``{dotted path: array}`` (for tests and export)."""
    _, state = nnx.split(model, nnx.Param)
    return {
        ".".join(str(p) for p in path): np.asarray(leaf.get_value())
        for path, leaf in nnx.to_flat_state(state)
    }

