"""The mesh-first state of a run, shared by train, sample, eval and plan.

  abstract model (``nnx.eval_shape``) -> parameter shardings (``config.sharding``)
  -> each tensor read from safetensors straight into its sharding
  -> optimizer state created under ``jit`` with ``out_shardings``.

No full-size parameter or optimizer leaf ever lands on one device (big_vision's
"state born sharded"): FLUX.1-dev's 44 GiB fp32 master weights and 89 GiB of
Adam moments exist only as shards. Restoring follows the same shardings, and
sample/eval restore the parameters alone, in the dtype they compute in.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prefgrpo_jax import checkpoint, convert, grpo, lora, sharding
from prefgrpo_jax.pipeline import FluxPipeline

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _rules(config: ml_collections.ConfigDict) -> tuple[int, list[tuple[str, tuple]]]:
    return int(config.sharding.fsdp_min_size), [tuple(r) for r in config.sharding.rules]


def sharding_fn(config: ml_collections.ConfigDict, mesh: Mesh) -> convert.ShardingFn:
    """``(dotted parameter key, shape) -> NamedSharding`` from ``config.sharding``."""
    min_size, rules = _rules(config)
    sizes = dict(mesh.shape)

    def fn(key: str, shape: tuple[int, ...]) -> NamedSharding:
        spec = sharding.partition_spec(key.replace(".", "/"), shape, sizes, min_size=min_size, rules=rules)
        return NamedSharding(mesh, spec)

    return fn


def tree_shardings(tree: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """NamedShardings for a pytree (params, optimizer state) by ``config.sharding``."""
    min_size, rules = _rules(config)
    return sharding.param_shardings(tree, mesh, min_size=min_size, rules=rules)


def activation_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """``config.sharding.activation_rules`` as ``[(logical axis, mesh axes)]``."""
    rules = config.sharding.activation_rules
    return [(name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules]


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of ``tree`` (a shard's size; sharded arrays' own
    shardings when ``shardings`` is None)."""
    total = 0
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings) if shardings is not None else [a.sharding for a in leaves]
    for leaf, s in zip(leaves, specs, strict=True):
        total += math.prod(s.shard_shape(tuple(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return total


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s carrying their target shardings (restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_pipeline(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None, *,
    transformer_dtype: jnp.dtype | None = None, load_transformer: bool = True,
) -> FluxPipeline:
    """The config's pipeline; with ``mesh`` every component is born sharded on it.

    Frozen parts (T5, CLIP, VAE) are sharded by the same rules as the policy, so
    they do not pin device 0.
    """
    return FluxPipeline.from_pretrained(
        config.model.path,
        dtype=DTYPES[config.model.dtype],
        remat=bool(config.model.remat),
        remat_policy=config.model.remat_policy,
        attention=config.model.attention,
        attention_chunk=int(config.model.attention_chunk),
        max_sequence_length=int(config.train.max_sequence_length),
        shardings=None if mesh is None else sharding_fn(config, mesh),
        transformer_dtype=transformer_dtype,
        compute_dtype=DTYPES[config.model.compute_dtype],
        load_transformer=load_transformer,
    )


def train_state_shardings(abstract_params: Any, optimizer: optax.GradientTransformation,
                          config: ml_collections.ConfigDict, mesh: Mesh, *, ema: bool = False
                          ) -> tuple[Any, Any]:
    """``(abstract train state, its shardings)``; nothing is allocated."""
    abstract = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer, ema=ema), abstract_params)
    return abstract, tree_shardings(abstract, config, mesh)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, shardings: Any, *,
                     ema: bool = False) -> grpo.TrainState:
    """The train state born in ``shardings``; ``params`` are donated (no second copy)."""
    init = jax.jit(lambda p: grpo.init_train_state(p, optimizer, ema=ema), out_shardings=shardings,
                   donate_argnums=0)
    return init(params)


def lora_state(pipe: FluxPipeline, spec: Any, config: ml_collections.ConfigDict, mesh: Mesh, *,
               fresh: bool) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, adapters, base)`` of a LoRA run (``config.model.lora``).

    ``base`` is the pipeline's transformer, taken over (``take_transformer_params``)
    as the frozen base; ``adapters`` are born in their shardings by ``model.lora.init``
    from ``fold_in(key(seed), 1)`` when ``fresh``, else abstract (a restore target).
    ``graphdef`` merges ``(adapters, base)`` (``pipeline.make_velocity_fn``).
    """
    _, base = pipe.take_transformer_params()
    graphdef, abstract, _ = lora.split(lora.abstract_model(pipe.transformer, spec))
    if not fresh:
        return graphdef, abstract, base
    key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
    adapters = lora.init_adapters(abstract, key, config.model.lora.init, tree_shardings(abstract, config, mesh))
    return graphdef, adapters, base


def copy_params(params: Any, shardings: Any) -> Any:
    """A separate buffer of ``params`` (the train state is donated each step)."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def _params_checkpointers(config: ml_collections.ConfigDict, workdir: str | Path
                          ) -> list[checkpoint.Checkpointer]:
    """Open checkpointers of both kinds (full state, params-only) that hold a step, newest first."""
    found = []
    for kind in checkpoint.KINDS:
        directory = Path(workdir) / checkpoint.DIRECTORIES[kind]
        if not directory.is_dir():
            continue
        ckpt = checkpoint.Checkpointer(directory, keep=config.keep_checkpoints, save_every=1, kind=kind)
        if ckpt.latest_step() is None:
            ckpt.close()
        else:
            found.append(ckpt)
    return sorted(found, key=lambda c: c.latest_step(), reverse=True)


def load_trained_pipeline(config: ml_collections.ConfigDict, workdir: str | Path,
                          mesh: Mesh | None = None) -> tuple[FluxPipeline, int | None]:
    """The pipeline with the newest checkpointed transformer, else the base weights.

    With a checkpoint the base transformer is never read and no optimizer state
    is restored: only ``params``, each leaf into its sharding and in
    ``config.model.dtype``. A LoRA run's checkpoints hold its adapters: the base
    is read and the adapters merged into it (a plain transformer to sample).
    """
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    checkpointers = _params_checkpointers(config, workdir)
    if not checkpointers:
        return load_pipeline(config, mesh), None
    spec = lora.spec_from_config(config)
    pipe = load_pipeline(config, mesh, load_transformer=spec is not None)
    if spec is None:
        _, abstract = nnx.split(pipe.transformer)
    else:
        _, abstract, _ = lora.split(lora.abstract_model(pipe.transformer, spec))
    target = with_shardings(abstract, tree_shardings(abstract, config, mesh))
    found = None
    try:
        for ckpt in checkpointers:
            # Full-state checkpoints hold the EMA beside the params; params-only
            # ones hold what was served (the EMA when ema.use) as their params.
            subtree = "ema" if ckpt.kind == "state" and config.ema.use else "params"
            found = ckpt.restore_params_newest_readable(target, subtree=subtree)
            if found is not None:
                log.info("restored the transformer of step %d from %s", found[0], ckpt.directory)
                break
    finally:
        for ckpt in checkpointers:
            ckpt.close()
    if found is None:
        return (pipe if spec is not None else load_pipeline(config, mesh)), None
    step, params = found
    if spec is not None:
        pipe.transformer = lora.merged_model(pipe.transformer, params, spec)
        return pipe, step
    return pipe.with_transformer_params(params), step
