"""Device mesh, parameter/batch shardings and multi-host start-up.

Mesh axes are ``("data", "fsdp", "tensor")``. The sample batch (prompts x
group) is split over ``("data", "fsdp")``. Parameters and optimizer state are
sharded FSDP-style over "fsdp" by a rule set from the config:

  ``sharding.fsdp_min_size``: tensors with fewer elements stay replicated;
  otherwise the largest dimension divisible by the "fsdp" size is split.

This size-based rule (big_vision's "fsdp" strategy) needs no per-parameter
annotations, so it applies unchanged to the transformer, reward models and
optimizer moments, and to checkpoints converted from diffusers or BFL files.

With ``mesh.tensor > 1`` the FLUX blocks are tensor-parallel (Megatron): the
column-parallel linears (the head-grouped qkv and single-block linear1, the
MLP's first linear) split their output features over "tensor", the
row-parallel ones (attention output projection, the MLP's second linear, the
single block's linear2) their input features, and FSDP splits the other
dimension (:data:`TENSOR_PARALLEL`, :func:`tensor_parallel_spec`). Each device
then gathers only its tensor shard of a weight, over "fsdp", and computes its
heads and MLP slice; the activations' "heads"/"mlp" logical axes map to
"tensor" (:data:`DEFAULT_ACTIVATION_RULES`). Other parameters are FSDP-split
over "fsdp" x "tensor" (over "fsdp" alone when no dimension divides).

``sharding.rules`` (a list of ``(regex, spec)``) overrides both per tensor: the
first regex that *searches* the tensor's path (``double_blocks/img_attn/qkv/
kernel``; optimizer moments contain their parameter's path) gives its spec, a
tuple of mesh axis names or None per dimension. Tensors no rule names fall back
to the tensor-parallel specs, then to FSDP.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves ``{"data", "fsdp", "tensor"}`` sizes; one of them may be -1.

    Raises:
      ValueError: naming the axis and the device count when the sizes do not fit.
    """
    values = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if sum(v == -1 for v in values) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, values))}")
    for axis, v in zip(MESH_AXES, values):
        if v == 0 or v < -1:
            raise ValueError(f"config.mesh.{axis}={v}: must be a positive size or -1 (all remaining devices)")
    known = int(np.prod([v for v in values if v != -1]))
    if -1 in values:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                f"{dict(zip(MESH_AXES, values))}"
            )
        values[values.index(-1)] = num_devices // known
    if int(np.prod(values)) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, values))} needs {int(np.prod(values))} devices, "
            f"but {num_devices} are available; use -1 for one axis to take the rest"
        )
    return tuple(values)  # type: ignore[return-value]


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# Logical activation axes -> mesh axes (flax lm1b / maxdiffusion style); the
# config's sharding.activation_rules overrides them.
DEFAULT_ACTIVATION_RULES = (("batch", BATCH_AXES), ("length", None), ("embed", None),
                            ("heads", "tensor"), ("mlp", "tensor"))
_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_ACTIVATION_RULES):
    """Within it, ``constrain`` pins activations to ``mesh`` by logical axis ``rules``.

    Read when a function is traced: wrap the calls that trace the sampler and
    the train step. Without it ``constrain`` is a no-op (tests, one device).
    """
    token = _ACTIVATIONS.set((mesh, {name: axes for name, axes in rules}))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the mesh axes its logical axes map to (one name per dim).

    Without constraints XLA's propagation follows the FSDP-sharded weights into
    the activations and moves them (all-gathers of whole activations in every
    block); pinned to the batch, only weights are gathered. A dimension the
    mapped axes do not divide stays unconstrained.
    """
    found = logical_spec(x.shape, logical)
    if found is None:
        return x
    mesh, spec = found
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def logical_size(name: str) -> int:
    """How many shards the active :func:`activation_sharding` splits logical axis
    ``name`` into (1 outside one)."""
    active = _ACTIVATIONS.get()
    if active is None:
        return 1
    mesh, rules = active
    axes = rules.get(name)
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def logical_spec(shape: Sequence[int], logical: Sequence[str | None]) -> tuple[Mesh, P] | None:
    """The active :func:`activation_sharding`'s mesh and the spec the logical
    axes of an array of ``shape`` map to (``None`` outside one).

    A dimension the mapped axes do not divide is left unsharded. Used by
    :func:`constrain`, and by kernels that must run under ``shard_map``.
    """
    active = _ACTIVATIONS.get()
    if active is None:
        return None
    mesh, rules = active
    if len(logical) != len(shape):
        raise ValueError(f"{len(logical)} logical axes for an array of shape {tuple(shape)}")
    spec = []
    for dim, name in zip(shape, logical):
        size = logical_size(name) if name else 1
        spec.append(rules[name] if size > 1 and dim % size == 0 else None)
    return mesh, P(*spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ("data", "fsdp")."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_like(tree: Any) -> NamedSharding | None:
    """Replicated sharding on the mesh ``tree``'s arrays live on; None off a mesh.

    Frozen encoders are stored FSDP-sharded but gathered inside their jitted
    call (``with_sharding_constraint`` to this): the weights are whole only
    while they run, and the math is the replicated program's, identical on any
    device layout.
    """
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, P())
    return None


def gather(tree: Any, replicated: NamedSharding | None) -> Any:
    """Inside jit: ``tree`` constrained to ``replicated`` (no-op when None)."""
    return tree if replicated is None else jax.lax.with_sharding_constraint(tree, replicated)


def batch_parallelism(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int,
              axes: str | tuple[str, ...] = "fsdp") -> P:
    """PartitionSpec splitting the largest dim of a tensor divisible by ``fsdp_size``
    (the size of the mesh ``axes`` it is split over)."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for dim in order:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = axes
            return P(*spec)
    return P()


def path_string(path: tuple) -> str:
    """``jax.tree_util`` key path -> ``a/b/0/kernel``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


# Megatron tensor parallelism of the FLUX blocks (stacked kernels are
# [layers, in, out], biases [layers, out]): "column" linears split their output
# features over "tensor" (whole heads: the fused ones are stored head-grouped,
# see flux.HeadGrouped), "row" linears their input features; the row-parallel
# outputs are summed over "tensor" by one all-reduce each.
TENSOR_PARALLEL = (
    (r"(double_blocks/(img|txt)_(attn/qkv|mlp/0)|single_blocks/linear1)/(kernel|bias)$", "column"),
    (r"(double_blocks/(img|txt)_(attn/proj|mlp/2)|single_blocks/linear2)/kernel$", "row"),
)


def tensor_parallel_spec(path: str, shape: tuple[int, ...], mesh_sizes: dict[str, int], *,
                         min_size: int) -> P | None:
    """The tensor-parallel spec of a FLUX block linear's kernel or bias; None for
    any other tensor, with ``mesh.tensor == 1``, or when "tensor" does not divide
    the split dimension (the tensor then falls back to FSDP).

    A kernel's other matrix dimension is split over "fsdp" (when it divides and
    the tensor has ``min_size`` elements): gathering over "fsdp" gives each
    device its tensor shard, never the whole weight.
    """
    tensor = mesh_sizes.get("tensor", 1)
    if tensor == 1 or len(shape) < 2:
        return None
    path = path.removesuffix("/value")  # nnx.State leaves are Variables: .../kernel/value
    kind = next((k for pattern, k in TENSOR_PARALLEL if re.search(pattern, path)), None)
    if kind is None:
        return None
    is_bias = path.endswith("bias")
    split = len(shape) - (2 if kind == "row" and not is_bias else 1)
    if shape[split] % tensor:
        return None
    spec: list[str | None] = [None] * len(shape)
    spec[split] = "tensor"
    other = len(shape) - (1 if split == len(shape) - 2 else 2)
    fsdp = mesh_sizes.get("fsdp", 1)
    if (not is_bias and fsdp > 1 and shape[other] % fsdp == 0
            and int(np.prod(shape, dtype=np.int64)) >= min_size):
        spec[other] = "fsdp"
    return P(*spec)


def partition_spec(
    path: str, shape: tuple[int, ...], mesh_sizes: dict[str, int], *, min_size: int,
    rules: Sequence[tuple[str, Sequence[str | None]]] = (),
) -> P:
    """The PartitionSpec of one tensor: the first matching rule, else the
    tensor-parallel spec (``mesh.tensor > 1``), else FSDP-by-size (over
    "fsdp" x "tensor" when ``mesh.tensor > 1`` and a dimension divides)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            spec = tuple(spec)
            if len(spec) != len(shape):
                raise ValueError(
                    f"config.sharding.rules: {pattern!r} gives {spec} for {path} of shape {shape} "
                    "(one entry per dimension)"
                )
            for dim, axis in zip(shape, spec):
                if axis is not None and dim % mesh_sizes[axis]:
                    raise ValueError(
                        f"config.sharding.rules: {pattern!r} splits {path} {shape} over {axis!r} "
                        f"(size {mesh_sizes[axis]}), which does not divide {dim}"
                    )
            return P(*spec)
    tensor_parallel = tensor_parallel_spec(path, shape, mesh_sizes, min_size=min_size)
    if tensor_parallel is not None:
        return tensor_parallel
    tensor = mesh_sizes.get("tensor", 1)
    if tensor > 1:
        # Not tensor-parallel: FSDP over fsdp x tensor when a dimension allows,
        # so "tensor" divides its memory too (the gather brings it whole either way).
        spec = fsdp_spec(shape, mesh_sizes["fsdp"] * tensor, min_size, axes=("fsdp", "tensor"))
        if spec != P():
            return spec
    return fsdp_spec(shape, mesh_sizes["fsdp"], min_size)


def param_shardings(
    tree: Any, mesh: Mesh, *, min_size: int = 2**14,
    rules: Sequence[tuple[str, Sequence[str | None]]] = (),
) -> Any:
    """NamedShardings for a pytree of arrays (params or optimizer state)."""
    sizes = dict(mesh.shape)

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        spec = partition_spec(path_string(path), shape, sizes, min_size=min_size, rules=rules)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a global host batch (every process holds the same full arrays) on the mesh.

    Multi-host: each process passes its *local* rows, see ``from_process_local``.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)


def from_process_local(tree: Any, mesh: Mesh) -> Any:
    """Assembles global batch arrays from each process's local rows."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def make_group_broadcast(mesh: Mesh, group_size: int) -> Callable[[Any], Any]:
    """``cond [P, ...] -> [P * group_size, ...]`` (each prompt's row repeated for
    its group), batch-sharded, computed on device.

    One process: the prompt rows go in as they are (on device) and each device
    writes only its own output rows. Several processes: each gives its local
    rows, which become a batch-sharded ``[P]`` array when ``P`` splits over the
    batch devices (the group's rows then land on the device that already holds
    the prompt: no communication); otherwise they are repeated on the host
    first (the rows of one prompt may then span devices of several processes).
    """
    out = batch_sharding(mesh)
    repeat = jax.jit(lambda tree: jax.tree.map(lambda a: jnp.repeat(a, group_size, axis=0), tree),
                     out_shardings=out)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]

    def broadcast(tree: Any) -> Any:
        if jax.process_count() == 1:
            return repeat(tree)
        rows = jax.tree.leaves(tree)[0].shape[0] * jax.process_count()
        if rows % batch_devices == 0:
            return repeat(from_process_local(tree, mesh))
        return from_process_local(jax.tree.map(lambda a: np.repeat(np.asarray(a), group_size, axis=0), tree),
                                  mesh)

    return broadcast


def allgather_host(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's host array along axis 0 (in process order)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def to_host(tree: Any) -> Any:
    """Fully replicated/addressable copies as NumPy (gathers across processes)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def initialize_distributed(cfg: Any) -> None:
    """``jax.distributed.initialize`` when ``config.distributed.enabled``.

    On TPU pods and SLURM/GPU clusters the arguments are auto-detected; on CPU
    (tests, two processes on localhost) the coordinator address, process count
    and id come from the config.
    """
    if not cfg.enabled:
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs = dict(
            coordinator_address=cfg.coordinator_address,
            num_processes=int(cfg.num_processes),
            process_id=int(cfg.process_id),
        )
    # Must not touch the backend before initialize(); CPU runs opt in by config.
    if cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
