"""``--mode=plan``: will this config fit that topology? Answered before renting it.

Builds the run's exact sampling and training programs abstractly (no weights:
``nnx.eval_shape`` models, ``ShapeDtypeStruct`` inputs carrying the shardings
the trainer gives them) on ``plan.devices`` simulated CPU devices, compiles
them with XLA, and reports per device: the sharded train state and frozen
parts, each program's temporaries (XLA's memory analysis), the peak, FLOPs and
collective bytes per step, and whether it fits ``plan.device_memory_gib``.

Model shapes come from ``config.model.path``'s ``config.json`` files, or from a
named preset (``plan.preset="flux1-dev"``) when no weights are at hand.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prefgrpo_jax import config as config_lib, grpo, program_analysis, sampling, sharding
from prefgrpo_jax import lora as lora_lib
from prefgrpo_jax import state as state_lib
from prefgrpo_jax.models import autoencoder, flux, text_encoders
from prefgrpo_jax.pipeline import compute_dtype_of, make_velocity_fn

log = logging.getLogger(__name__)
GIB = 2**30
PRESETS = ("flux1-dev",)
# The trained parameters' row: full fine-tuning's fp32 masters, or LoRA's adapters
# (whose frozen base is a row of its own).
TRAINED_LABEL = {False: "params (fp32 master)", True: "LoRA adapters (fp32)"}


class PlanDoesNotFitError(SystemExit):
    """The planned run needs more memory per device than the topology has."""


def model_configs(config: config_lib.RunConfig) -> dict[str, Any]:
    """Transformer, T5, CLIP-text and VAE configs: a preset's or the model directory's."""
    preset = config.plan.preset
    if preset == "flux1-dev":
        return {
            "transformer": flux.FluxConfig.flux_dev(),
            "t5": text_encoders.T5Config(),  # T5-v1.1-XXL: the class defaults
            # FLUX.1-dev's text_encoder/config.json (OpenAI CLIP ViT-L/14 text tower).
            "clip": text_encoders.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                 num_attention_heads=12, projection_dim=768,
                                                 eos_token_id=2),
            "vae": autoencoder.AutoencoderConfig.flux_dev(),
        }
    root = Path(config.model.path)
    return {
        "transformer": flux.diffusers_config(root / "transformer")[0],
        "t5": text_encoders.T5Config.from_hf(text_encoders.read_hf_config(root / "text_encoder_2")),
        "clip": text_encoders.CLIPTextConfig.from_hf(text_encoders.read_hf_config(root / "text_encoder")),
        "vae": autoencoder.AutoencoderConfig.from_diffusers(json.loads((root / "vae" / "config.json").read_text())),
    }


def fsdp_floor(params: Any, shardings: Any, compute_dtype: Any, *, sampler, grpo_cfg, remat: bool,
               updates: int, frozen: Any = None, frozen_shardings: Any = None,
               tensor_parallel: int = 0, rows: tuple[int, int] = (0, 0)) -> dict[str, int]:
    """Collective output bytes per device that FSDP (and tensor parallelism) cannot avoid, per step.

    Every forward pass gathers each sharded weight, in the compute dtype: the
    whole weight, or with tensor parallelism the device's "tensor" shard of a
    tensor-parallel one (gathered over "fsdp"); training gathers again for the
    backward pass when blocks are rematerialised, and reduce-scatters each
    gradient (fp32, one shard's bytes) once per forward/backward pass
    (micro-batches x timestep chunks). ``frozen`` (LoRA's base) is gathered like
    the params but has no gradient.

    ``tensor_parallel``: :func:`tensor_parallel_bytes` of one forward pass over
    one row, 0 without tensor parallelism; ``rows``: the rows (samples x
    timesteps) per device of a sampling step and of a training pass. Sampling
    adds one forward pass's all-reduces per step; a training pass adds its
    forward's, the rematerialised forward's and the backward's (the column-parallel
    linears' input gradients, as many as the forward's).
    """
    gathered = scattered = 0
    trees = [(params, shardings, True), (frozen, frozen_shardings, False)]
    for tree, tree_shardings, trained in trees:
        for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)):
            if any(axis is not None for axis in s.spec):
                gathered += math.prod(_gathered_shape(tuple(leaf.shape), s)) * jnp.dtype(compute_dtype).itemsize
                if trained:
                    scattered += math.prod(s.shard_shape(tuple(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    k = grpo_cfg.num_train_timesteps(sampler.num_steps)
    passes = grpo_cfg.micro_batches * (k // grpo_cfg.timestep_chunk)
    forwards = 2 if remat else 1
    return {
        "sampling": sampler.num_steps * (gathered + tensor_parallel * rows[0]),
        "training": updates * passes * (forwards * gathered + scattered
                                        + (forwards + 1) * tensor_parallel * rows[1]),
        "tensor-parallel all-reduces (sampling)": sampler.num_steps * tensor_parallel * rows[0],
        "tensor-parallel all-reduces (training)": updates * passes * (forwards + 1) * tensor_parallel * rows[1],
    }


def _gathered_shape(shape: tuple[int, ...], s) -> tuple[int, ...]:
    """A weight's shape once gathered for use: a dimension split over "fsdp" (alone
    or with "tensor": FSDP over both) comes whole; a tensor-parallel split stays."""
    out = list(shape)
    for dim, axes in enumerate(tuple(s.spec)):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if "fsdp" not in names:
            out[dim] //= math.prod(s.mesh.shape[a] for a in names)
    return tuple(out)


def tensor_parallel_bytes(cfg: flux.FluxConfig, mesh, tokens: int, itemsize: int) -> int:
    """Output bytes per device of one forward pass's tensor-parallel all-reduces, per batch row.

    Every row-parallel linear's output ``[rows, L, hidden]`` is summed over
    "tensor": per double block the img and txt attention projections and MLPs
    (twice the joint ``tokens``), per single block linear2 (``tokens``). 0 when
    ``mesh.tensor == 1``.
    """
    if mesh.shape["tensor"] == 1:
        return 0
    return tokens * cfg.hidden_size * itemsize * (2 * cfg.depth + cfg.depth_single)


def sharded_shapes(params: Any, shardings: Any) -> list[tuple[int, ...]]:
    """Shapes of the sharded parameters' gradients before their reduction over the
    batch devices, and of one layer of each (stacked blocks): the whole parameter,
    or its "tensor" shard under tensor parallelism."""
    shapes = []
    for leaf, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        if any(axis is not None for axis in s.spec):
            shape = _gathered_shape(tuple(leaf.shape), s)
            shapes.append(shape)
            if len(shape) >= 3:
                shapes.append(shape[1:])
    return shapes


def as_reduce_scatters(collectives: dict[str, Any], mesh) -> float:
    """Collective bytes with each gradient all-reduce replaced by the reduce-scatter
    a GPU/TPU compile makes of it: one fsdp shard of the output (plus an
    all-reduce of that shard over ``data`` when the mesh has data parallelism). With
    ``mesh.tensor > 1`` a parameter FSDP-split over fsdp x tensor reduce-scatters
    to 1/tensor of that shard: counted as the larger fsdp shard, an overcount."""
    grads = collectives.get(program_analysis.GRADIENT_ALL_REDUCE, 0)
    per_shard = grads / mesh.shape["fsdp"]
    return collectives["total"] - grads + per_shard * (1 if mesh.shape["data"] == 1 else 2)


def _abstract_params(factory) -> tuple[nnx.GraphDef, Any]:
    return nnx.split(nnx.eval_shape(factory))


def _batch_abstract(tree: Any, mesh, batch: int) -> Any:
    """``ShapeDtypeStruct``s: leaves with a leading batch dim sharded like the trainer's."""
    batch_sharding, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=batch_sharding if a.shape[:1] == (batch,) else repl),
        tree)


def _compile(name: str, lowered) -> tuple[Any, float]:
    t0 = time.perf_counter()
    print(f"  compiling the {name} program ...", flush=True)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    print(f"  compiled the {name} program in {seconds:.0f} s", flush=True)
    return compiled, seconds


def build_report(config: ml_collections.ConfigDict | config_lib.RunConfig) -> dict[str, Any]:
    """Compiles both programs for ``config`` on the simulated devices; the report dict."""
    p = config.plan
    n_dev = jax.device_count()
    if n_dev != p.devices:
        raise RuntimeError(f"plan: {p.devices} devices were asked for but JAX has {n_dev}; "
                           "run through `python -m prefgrpo_jax.main --mode=plan`, which sets them up")
    config = config_lib.build(config, mode="plan", num_devices=n_dev)
    mesh = sharding.make_mesh(config.mesh.sizes())
    # Traced as the trainer traces them: activations pinned to the batch.
    with sharding.activation_sharding(mesh, state_lib.activation_rules(config)):
        return _build_report(config, mesh)


def _plan_attention(name: str) -> str:
    """The attention the plan compiles: it runs on simulated CPU devices, where
    cuDNN and splash kernels cannot lower, so those are planned as ``chunked``
    (like them, O(L x block) memory instead of einsum's O(L^2))."""
    if name in ("cudnn", "splash"):
        log.info("plan: model.attention=%r has no CPU lowering; planning its memory with 'chunked'", name)
        return "chunked"
    return name


def _build_report(config: config_lib.RunConfig, mesh) -> dict[str, Any]:
    from prefgrpo_jax.train import build_optimizer, grpo_config, sampler_config

    p, t = config.plan, config.train
    n_dev = jax.device_count()
    cfgs = model_configs(config)
    model_dtype = state_lib.DTYPES[config.model.dtype]

    # Policy: fp32 master weights, the trainer's shardings. LoRA: fp32 adapters
    # trained, the base frozen in model.dtype (state.lora_state).
    spec = config.model.lora.spec()
    transformer = flux.abstract_transformer(
        cfgs["transformer"], dtype=jnp.float32 if spec is None else model_dtype, remat=bool(config.model.remat),
        remat_policy=config.model.remat_policy, compute_dtype=state_lib.DTYPES[config.model.compute_dtype],
        attention=_plan_attention(config.model.attention),
        attention_chunk=int(config.model.attention_chunk))
    graphdef, params = nnx.split(transformer)
    base = base_shardings = base_abs = None
    if spec is not None:
        base = params
        graphdef, params, _ = lora_lib.split(lora_lib.abstract_model(transformer, spec))
        base_shardings = state_lib.tree_shardings(base, config, mesh)
        base_abs = state_lib.with_shardings(base, base_shardings)
    optimizer = build_optimizer(config)
    abstract_state, state_shardings = state_lib.train_state_shardings(params, optimizer, config, mesh)
    state_abs = state_lib.with_shardings(abstract_state, state_shardings)

    frozen = {
        "t5": _abstract_params(lambda: text_encoders.T5Encoder(cfgs["t5"], rngs=nnx.Rngs(0), param_dtype=model_dtype))[1],
        "clip": _abstract_params(lambda: text_encoders.CLIPTextTransformer(cfgs["clip"], rngs=nnx.Rngs(0), param_dtype=model_dtype))[1],
        "vae": _abstract_params(lambda: autoencoder.Autoencoder(cfgs["vae"], rngs=nnx.Rngs(0), param_dtype=model_dtype))[1],
    }
    if base is not None:
        frozen["transformer base (LoRA)"] = base
    frozen_bytes = {k: state_lib.per_device_bytes(v, state_lib.tree_shardings(v, config, mesh)) for k, v in frozen.items()}
    ref_bytes = 0
    ref_abs = None
    if t.kl_beta > 0 and spec is None:  # LoRA's reference: the adapters off, no copy
        ref_abs = state_abs["params"]
        ref_bytes = state_lib.per_device_bytes(abstract_state["params"], state_shardings["params"])

    # Shapes of one step.
    f = cfgs["vae"].vae_scale_factor
    h, w = autoencoder.latent_hw(t.height, t.width, f)
    seq = (h // 2) * (w // 2)
    latent_shape = (seq, cfgs["transformer"].in_channels)
    batch = t.prompts_per_step * t.group_size
    txt_len = int(t.max_sequence_length)
    tc = cfgs["transformer"]
    cond = {
        "img_ids": jax.ShapeDtypeStruct((batch, seq, 3), jnp.float32),
        "txt": jax.ShapeDtypeStruct((batch, txt_len, tc.context_dim), jnp.float32),
        "txt_ids": jax.ShapeDtypeStruct((batch, txt_len, 3), jnp.float32),
        "y": jax.ShapeDtypeStruct((batch, tc.vec_dim), jnp.float32),
    }
    if tc.guidance_embed:
        cond["guidance"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = _batch_abstract(cond, mesh, batch)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(mesh))
    sampler = sampler_config(config, seq)
    velocity_fn = make_velocity_fn(graphdef, compute_dtype_of(transformer))
    model_params = state_abs["params"] if base_abs is None else (state_abs["params"], base_abs)

    print(f"plan: {n_dev} simulated devices, mesh {dict(mesh.shape)}, {batch} images/step "
          f"({t.prompts_per_step} prompts x {t.group_size}), {t.height}x{t.width} px "
          f"({seq} image + {txt_len} text tokens), {t.num_steps} steps", flush=True)
    lowered_s = sampling.sample_trajectory.lower(velocity_fn, sampler, model_params, key, cond, latent_shape)
    sampler_flops = program_analysis.jaxpr_flops(jax.make_jaxpr(
        lambda prm, k, c: sampling.sample_trajectory(velocity_fn, sampler, prm, k, c, latent_shape))(
            model_params, key, cond))
    compiled_s, secs_s = _compile("sampling", lowered_s)

    traj = jax.eval_shape(lambda prm, k, c: sampling.sample_trajectory(velocity_fn, sampler, prm, k, c, latent_shape),
                          model_params, key, cond)
    adv = jax.ShapeDtypeStruct((batch,), jnp.float32)
    grpo_cfg = grpo_config(config)
    updates = grpo_cfg.updates_per_rollout
    # One optimizer update's batch: a 1/updates slice of every group, with its
    # trained timesteps drawn for the rollout (as Trainer.step builds it).
    rollout = jax.eval_shape(
        lambda tr, a, c, k: grpo.with_timesteps(grpo.rollout_batch(tr, a, c), k, num_steps=sampler.num_steps,
                                                k=grpo_cfg.num_train_timesteps(sampler.num_steps)),
        traj, adv, cond, key)
    per_update = batch // updates
    batch_abs = _batch_abstract(
        jax.eval_shape(lambda r: grpo.rollout_part(r, 0, updates, t.group_size), rollout), mesh, per_update)
    repl = sharding.replicated(mesh)
    train_step = grpo.make_train_step(velocity_fn, sampler, grpo_cfg, optimizer,
                                      jit_kwargs={"out_shardings": (state_shardings, repl)})
    lowered_t = train_step.lower(state_abs, batch_abs, key, ref_abs, base_abs)
    train_flops = program_analysis.jaxpr_flops(jax.make_jaxpr(
        grpo.make_train_step(velocity_fn, sampler, grpo_cfg, optimizer, jit=False))(
            state_abs, batch_abs, key, ref_abs, base_abs))
    compiled_t, secs_t = _compile("training", lowered_t)

    mem_s = program_analysis.memory_stats(compiled_s)
    mem_t = program_analysis.memory_stats(compiled_t)
    coll_s = program_analysis.collective_bytes(compiled_s.as_text())
    coll_t = program_analysis.collective_bytes(
        compiled_t.as_text(), gradient_shapes=sharded_shapes(abstract_state["params"], state_shardings["params"]))
    coll_t_pod = as_reduce_scatters(coll_t, mesh)

    # XLA's CPU backend upcasts bf16 dots to f32 and gathers the weights in f32;
    # GPU/TPU compiles gather in the compute dtype. The simulated floor uses f32.
    batch_devices = sharding.batch_parallelism(mesh)
    floor = fsdp_floor(abstract_state["params"], state_shardings["params"], jnp.float32,
                       sampler=sampler, grpo_cfg=grpo_cfg, remat=bool(config.model.remat), updates=updates,
                       frozen=base, frozen_shardings=base_shardings,
                       tensor_parallel=tensor_parallel_bytes(tc, mesh, seq + txt_len, 4),
                       rows=(batch // batch_devices,
                             per_update // grpo_cfg.micro_batches * grpo_cfg.timestep_chunk // batch_devices))
    params_b = state_lib.per_device_bytes(abstract_state["params"], state_shardings["params"])
    opt_b = state_lib.per_device_bytes(abstract_state["opt_state"], state_shardings["opt_state"])
    frozen_b = sum(frozen_bytes.values())
    # Resident through the whole step: train state, frozen parts, KL reference.
    resident = params_b + opt_b + frozen_b + ref_bytes
    # Sampling: the program's temporaries and its output (the trajectory) on top.
    peak_sampling = resident + mem_s["temp_bytes"] + mem_s["output_bytes"]
    # Training: its arguments (state, trajectory batch, reference; LoRA's base)
    # + outputs not aliased to donated inputs + temporaries, beside the other
    # frozen parts.
    peak_training = frozen_b - frozen_bytes.get("transformer base (LoRA)", 0) + mem_t["peak_estimate_bytes"]
    peak = max(peak_sampling, peak_training)
    budget = float(p.device_memory_gib) * float(p.usable_fraction) * GIB
    return {
        "devices": n_dev,
        "mesh": dict(mesh.shape),
        "device_memory_gib": float(p.device_memory_gib),
        "usable_fraction": float(p.usable_fraction),
        "model": p.preset or str(config.model.path),
        "images_per_step": batch,
        "resolution": [t.height, t.width],
        "tokens": {"image": seq, "text": txt_len},
        "per_device_gib": {
            TRAINED_LABEL[spec is not None]: params_b / GIB,
            "optimizer state": opt_b / GIB,
            **{f"frozen {k} ({config.model.dtype})": v / GIB for k, v in frozen_bytes.items()},
            "KL reference params": ref_bytes / GIB,
            "sampling temporaries": mem_s["temp_bytes"] / GIB,
            "trajectory (sampling output)": mem_s["output_bytes"] / GIB,
            "training temporaries": mem_t["temp_bytes"] / GIB,
            "peak while sampling": peak_sampling / GIB,
            "peak while training": peak_training / GIB,
            "peak": peak / GIB,
        },
        "tflop_per_step": (sampler_flops["dot_flops"] + updates * train_flops["dot_flops"]) / 1e12,
        "tflop_per_step_per_device": (sampler_flops["dot_flops"] + updates * train_flops["dot_flops"]) / 1e12 / n_dev,
        "collective_gb_per_step_per_device": {
            "sampling": coll_s["total"] / 1e9,
            "training": updates * coll_t["total"] / 1e9,
            "training (gradient all-reduces as reduce-scatters)": updates * coll_t_pod / 1e9,
            "FSDP floor (sampling)": floor["sampling"] / 1e9,
            "FSDP floor (training)": floor["training"] / 1e9,
            **{f"{k} in the floor": v / 1e9 for k, v in floor.items() if k.startswith("tensor-parallel")},
            "note": "simulated on CPU, where XLA gathers bf16-computed weights in f32 (on GPU/TPU "
                    "the gathers of a bf16 compute_dtype move half these bytes) and keeps each sharded "
                    "gradient as a whole-size all-reduce and a slice, which the GPU/TPU compilers turn "
                    "into a reduce-scatter of one shard (the second training figure)",
            "by kind (sampling)": {k: v / 1e9 for k, v in coll_s.items() if k not in ("total", "unknown_trip_counts")},
            "by kind (training)": {k: updates * v / 1e9 for k, v in coll_t.items() if k not in ("total", "unknown_trip_counts")},
            "loops without a known trip count (counted once)": coll_s["unknown_trip_counts"] + coll_t["unknown_trip_counts"],
        },
        "compile_seconds": {"sampling": secs_s, "training": secs_t},
        "lora": spec is not None,
        "fits": peak <= budget,
        "headroom_gib": (budget - peak) / GIB,
        "not_counted": "VAE decode and reward-model temporaries (run between the two programs, "
                       "small beside them); framework/runtime reservations (e.g. XLA GPU's "
                       "preallocation fraction)",
    }


def report_markdown(r: dict[str, Any], command: str) -> str:
    lines = [
        f"## {r['model']} on {r['devices']} x {r['device_memory_gib']:g} GiB (mesh {r['mesh']})", "",
        f"`{command}`", "",
        f"{r['images_per_step']} images per step at {r['resolution'][0]}x{r['resolution'][1]} "
        f"({r['tokens']['image']} image + {r['tokens']['text']} text tokens).", "",
        "| per device | GiB |", "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3g} |" for k, v in r["per_device_gib"].items()]
    coll = r["collective_gb_per_step_per_device"]
    lines += [
        "",
        f"- **{'fits' if r['fits'] else 'does not fit'}**: peak {r['per_device_gib']['peak']:.3g} GiB of the "
        f"{r['usable_fraction'] * r['device_memory_gib']:.1f} GiB usable ({r['usable_fraction']:g} x "
        f"{r['device_memory_gib']:g} GiB; {r['headroom_gib']:+.3g} GiB headroom)",
        f"- FLOPs per step: {r['tflop_per_step'] / 1e3:.4g} PFLOP ({r['tflop_per_step_per_device'] / 1e3:.4g} per device)",
        f"- collective output per step per device: sampling {coll['sampling']:.4g} GB "
        f"({coll['sampling'] / max(coll['FSDP floor (sampling)'], 1e-9):.2f}x the FSDP floor of "
        f"{coll['FSDP floor (sampling)']:.4g} GB), training {coll['training']:.4g} GB "
        f"({coll['training'] / max(coll['FSDP floor (training)'], 1e-9):.2f}x the floor of "
        f"{coll['FSDP floor (training)']:.4g} GB; "
        f"{coll['training (gradient all-reduces as reduce-scatters)']:.4g} GB = "
        f"{coll['training (gradient all-reduces as reduce-scatters)'] / max(coll['FSDP floor (training)'], 1e-9):.2f}x "
        "with the gradient all-reduces as the reduce-scatters GPU/TPU compile them to)",
        *([f"- of the floor, tensor-parallel activation all-reduces: sampling "
           f"{coll['tensor-parallel all-reduces (sampling) in the floor']:.4g} GB, training "
           f"{coll['tensor-parallel all-reduces (training) in the floor']:.4g} GB"]
          if r["mesh"].get("tensor", 1) > 1 else []),
        f"- compile time here: sampling {r['compile_seconds']['sampling']:.0f} s, training "
        f"{r['compile_seconds']['training']:.0f} s",
        f"- not counted: {r['not_counted']}",
    ]
    return "\n".join(lines) + "\n"


def plan(config: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str | Path,
         command: str = "") -> dict[str, Any]:
    """Prints the plan, writes ``workdir/plan.{json,md}``; raises ``PlanDoesNotFitError``
    (exit status 1) when the peak exceeds ``plan.device_memory_gib``."""
    report = build_report(config)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(report, indent=2) + "\n")
    md = report_markdown(report, command)
    (out / "plan.md").write_text(md)
    print(md, flush=True)
    if not report["fits"]:
        g = report["per_device_gib"]
        raise PlanDoesNotFitError(
            f"plan: does not fit: peak {g['peak']:.2f} GiB per device > {report['usable_fraction']:g} x "
            f"{report['device_memory_gib']:g} GiB usable "
            f"(state {g[TRAINED_LABEL[report['lora']]] + g['optimizer state']:.2f}, peak while training "
            f"{g['peak while training']:.2f}, while sampling {g['peak while sampling']:.2f}); use more "
            "devices (FSDP divides the state), fewer images per step"
            + ("" if report["lora"] else ", or LoRA (configs/flux_lora.py)")
        )
    return report
