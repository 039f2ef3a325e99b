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

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prefgrpo_jax import checkpoint, convert, grpo, lora, sharding
from prefgrpo_jax.config import RunConfig
from prefgrpo_jax.models.flux import LoraSpec
from prefgrpo_jax.pipeline import FluxPipeline, make_velocity_fn

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _rules(config: RunConfig) -> tuple[int, list[tuple[str, tuple]]]:
    return int(config.sharding.fsdp_min_size), [tuple(r) for r in config.sharding.rules]


def sharding_fn(config: RunConfig, mesh: Mesh) -> convert.ShardingFn:
    """``(dotted parameter key, shape) -> NamedSharding`` from ``config.sharding``."""
    min_size, rules = _rules(config)
    sizes = dict(mesh.shape)

    def fn(key: str, shape: tuple[int, ...]) -> NamedSharding:
        spec = sharding.partition_spec(key.replace(".", "/"), shape, sizes, min_size=min_size, rules=rules)
        return NamedSharding(mesh, spec)

    return fn


def tree_shardings(tree: Any, config: RunConfig, mesh: Mesh) -> Any:
    """NamedShardings for a pytree (params, optimizer state) by ``config.sharding``."""
    min_size, rules = _rules(config)
    return sharding.param_shardings(tree, mesh, min_size=min_size, rules=rules)


def activation_rules(config: RunConfig) -> list[tuple[str, Any]]:
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
    config: RunConfig, mesh: Mesh | None = None, *,
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
                          config: RunConfig, mesh: Mesh, *, ema: bool = False
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


def lora_state(pipe: FluxPipeline, spec: LoraSpec, config: RunConfig, mesh: Mesh, *,
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


def _params_checkpointers(config: RunConfig, workdir: str | Path
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


def load_trained_pipeline(config: RunConfig, workdir: str | Path,
                          mesh: Mesh | None = None) -> tuple[FluxPipeline, int | None]:
    """The pipeline with the newest checkpointed transformer, else the base weights.

    With a checkpoint the base transformer is never read and no optimizer state
    is restored: only ``params``, each leaf into its sharding and in
    ``config.model.dtype``. A LoRA run's checkpoints hold its adapters: the base
    is read and the adapters merged into it (a plain transformer to sample).
    """
    mesh = mesh or sharding.make_mesh(config.mesh.sizes())
    checkpointers = _params_checkpointers(config, workdir)
    if not checkpointers:
        return load_pipeline(config, mesh), None
    spec = config.model.lora.spec()
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


def checkpointers(config: RunConfig, workdir: Path
                  ) -> tuple[checkpoint.Checkpointer, checkpoint.Checkpointer | None]:
    """A training run's full-state checkpointer and its params-only one (None when off)."""
    state = checkpoint.Checkpointer(workdir / checkpoint.DIRECTORIES["state"], keep=config.keep_checkpoints,
                                    save_every=config.checkpoint_every)
    if not config.params_checkpoint_every:
        return state, None
    return state, checkpoint.Checkpointer(
        workdir / checkpoint.DIRECTORIES["params"], keep=config.keep_checkpoints,
        save_every=config.params_checkpoint_every, kind="params")


@dataclasses.dataclass
class Policy:
    """What a training run trains, born sharded on its mesh.

    Attributes:
      pipe: the pipeline; its transformer's params were taken over (the state
        holds the trained ones; no second copy).
      velocity_fn: ``(params or (adapters, base), x, t, cond) -> v``.
      lora: the adapters' spec, or None for full fine-tuning.
      frozen: LoRA's frozen base transformer (passed beside the adapters), else None.
      state: the train state (params, optimizer state, step, EMA); abstract with
        its shardings when resuming (``Checkpointer`` restores into it).
      abstract_state: its shapes and dtypes.
      state_shardings: its NamedShardings.
      ref_params: the KL reference of full fine-tuning with ``kl_beta > 0``
        (LoRA's reference is the adapters off: none), else None.
    """

    pipe: FluxPipeline
    velocity_fn: Callable
    lora: LoraSpec | None
    frozen: Any
    state: Any
    abstract_state: Any
    state_shardings: Any
    ref_params: Any


def trainable_policy(config: RunConfig, mesh: Mesh, optimizer: optax.GradientTransformation, *,
                     resuming: bool, ema: bool) -> Policy:
    """The pipeline and train state of a run: master weights in fp32 (or LoRA
    adapters over a frozen base in ``model.dtype``), frozen parts in ``model.dtype``,
    every component born in its sharding on ``mesh``."""
    spec = config.model.lora.spec()
    kl = config.train.kl_beta > 0
    # Resuming without a KL reference never reads the base transformer (LoRA
    # always needs it: its checkpoints hold the adapters alone).
    pipe = load_pipeline(config, mesh, transformer_dtype=None if spec else jnp.float32,
                         load_transformer=not resuming or kl or spec is not None)
    frozen = None
    if spec is None:
        _, params = pipe.take_transformer_params()
        velocity_fn = pipe.velocity_fn
    else:
        graphdef, params, frozen = lora_state(pipe, spec, config, mesh, fresh=not resuming)
        velocity_fn = make_velocity_fn(graphdef, pipe.velocity_compute_dtype)
    abstract, shardings = train_state_shardings(params, optimizer, config, mesh, ema=ema)
    # Full fine-tuning's frozen reference = the initial weights, in a buffer of their own.
    ref_params = copy_params(params, shardings["params"]) if kl and spec is None else None
    state = (with_shardings(abstract, shardings) if resuming
             else init_train_state(params, optimizer, shardings, ema=ema))
    return Policy(pipe=pipe, velocity_fn=velocity_fn, lora=spec, frozen=frozen, state=state,
                  abstract_state=abstract, state_shardings=shardings, ref_params=ref_params)
