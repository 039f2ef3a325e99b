"""Run on 8 simulated devices by tests/test_tensor_parallel.py.

  python tests/tensor_probe.py numerics   # one device vs mesh {fsdp: 4, tensor: 2}
  python tests/tensor_probe.py hlo        # collectives of the compiled sampling loop

``numerics``: a small FLUX with LoRA adapters on every target (B made nonzero,
so the adapters act), as one state trained whole: the forward pass, a 3-step
trajectory and one GRPO train step on one device and on the tensor-parallel
mesh; prints the differences (JSON).

``hlo``: the sampling loop compiled on the mesh with the trainer's parameter
shardings and activation constraints; prints every collective's result shapes,
the shapes a weight has once gathered over "fsdp" only, and the token
activations' shapes (JSON).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax import grpo, sampling, sharding
from prefgrpo_jax.models import flux
from prefgrpo_jax.pipeline import make_velocity_fn

MESH = {"data": 1, "fsdp": 4, "tensor": 2}
CFG = flux.FluxConfig.tiny(hidden_size=128, num_heads=4, axes_dim=(8, 12, 12))  # head_dim 32
BATCH, SEQ, TXT = 8, 16, 8
MIN_SIZE = 256  # FSDP every matrix of the small model


def inputs(batch: int, seq: int, txt: int) -> dict:
    keys = jax.random.split(jax.random.key(7), 4)
    ids = jnp.stack(jnp.meshgrid(jnp.zeros(1), jnp.arange(4), jnp.arange(seq // 4), indexing="ij"), -1)
    return {
        "img_ids": jnp.broadcast_to(ids.reshape(-1, 3), (batch, seq, 3)).astype(jnp.float32),
        "txt": jax.random.normal(keys[0], (batch, txt, CFG.context_dim)),
        "txt_ids": jnp.zeros((batch, txt, 3), jnp.float32),
        "y": jax.random.normal(keys[1], (batch, CFG.vec_dim)),
        "guidance": jnp.full((batch,), 3.5),
    }


def lora_model() -> tuple[nnx.GraphDef, nnx.State]:
    targets = tuple(sorted(set(flux.DOUBLE_LORA_TARGETS + flux.SINGLE_LORA_TARGETS)))
    model = flux.FluxTransformer(CFG, rngs=nnx.Rngs(0), lora=flux.LoraSpec(rank=4, alpha=8.0, targets=targets))
    graphdef, params = nnx.split(model)
    key = jax.random.key(3)

    def nonzero_b(path, a):
        if sharding.path_string(path).endswith("lora_b"):
            return 0.05 * jax.random.normal(jax.random.fold_in(key, a.size + a.shape[-1]), a.shape, a.dtype)
        return a

    return graphdef, jax.tree_util.tree_map_with_path(nonzero_b, params)


def run(graphdef, params, cond, mesh=None) -> dict:
    """Forward pass, trajectory and one train step; numpy results."""
    velocity = make_velocity_fn(graphdef)
    sampler = sampling.SamplerConfig(num_steps=3, schedule="sd3", group_size=4)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0, timestep_chunk=1)
    optimizer = grpo.make_optimizer(1e-3)
    x = jax.random.normal(jax.random.key(5), (BATCH, SEQ, CFG.in_channels))
    t = jnp.linspace(0.2, 0.9, BATCH)
    if mesh is not None:
        params = jax.device_put(params, sharding.param_shardings(params, mesh, min_size=MIN_SIZE))
        cond, x, t = sharding.shard_batch((cond, x, t), mesh)
    v = jax.jit(velocity)(params, x, t, cond)
    traj = sampling.sample_trajectory(velocity, sampler, params, jax.random.key(1), cond, (SEQ, CFG.in_channels))
    batch = grpo.rollout_batch(traj, jnp.linspace(-0.5, 1.5, BATCH), cond)  # mean != 0: a nonzero loss
    step = grpo.make_train_step(velocity, sampler, cfg, optimizer)
    # The step donates its state: a copy, so the parameters stay for the next run.
    _, metrics = step(grpo.init_train_state(jax.tree.map(jnp.copy, params), optimizer), batch, jax.random.key(2))
    return {"velocity": np.asarray(v), "latents": np.asarray(traj.latents), "log_probs": np.asarray(traj.log_probs),
            "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}


def numerics() -> None:
    graphdef, params = lora_model()
    cond = inputs(BATCH, SEQ, TXT)
    one = run(graphdef, params, cond)
    mesh = sharding.make_mesh(MESH)
    with sharding.activation_sharding(mesh):
        tp = run(graphdef, params, cond, mesh)
    specs = sharding.param_shardings(params, mesh, min_size=MIN_SIZE)
    print(json.dumps({
        **{f"{k}_max_abs_diff": float(np.abs(one[k] - tp[k]).max()) for k in ("velocity", "latents", "log_probs")},
        "velocity_max_abs": float(np.abs(one["velocity"]).max()),
        "loss": [one["loss"], tp["loss"]], "grad_norm": [one["grad_norm"], tp["grad_norm"]],
        "specs": {p: str(s.spec) for p, s in (
            (sharding.path_string(path), s) for path, s in jax.tree_util.tree_flatten_with_path(specs)[0])
            if "lora" not in p and "blocks" in p},
    }))


def fsdp_gathered(shape, spec, mesh) -> tuple[int, ...]:
    """A weight's shape once gathered over "fsdp" only (its "tensor" split kept)."""
    return tuple(n // mesh.shape["tensor"] if axis == "tensor" else n for n, axis in zip(shape, spec))


def hlo() -> None:
    mesh = sharding.make_mesh(MESH)
    graphdef, params = nnx.split(flux.abstract_transformer(CFG))
    shardings = sharding.param_shardings(params, mesh, min_size=MIN_SIZE)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    batch, seq, txt = 16, 104, 14  # lengths (factors 13, 7) no weight dimension or shard has
    bs, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    cond = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bs),
                        jax.eval_shape(lambda: inputs(batch, seq, txt)))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=repl)
    config = sampling.SamplerConfig(num_steps=3, group_size=4)
    with sharding.activation_sharding(mesh):
        compiled = sampling.sample_trajectory.lower(
            make_velocity_fn(graphdef), config, params, key, cond, (seq, CFG.in_channels)).compile()
    gathered = set()
    for leaf in jax.tree.leaves(params):
        shape = fsdp_gathered(leaf.shape, tuple(leaf.sharding.spec) + (None,) * leaf.ndim, mesh)
        gathered |= {shape, shape[1:]}
    from prefgrpo_jax import program_analysis

    rows = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    print(json.dumps({
        "collectives": program_analysis.collective_shapes(compiled.as_text()),
        "fsdp_gathered_weights": sorted(gathered),
        "whole_weights": sorted({tuple(a.shape) for a in jax.tree.leaves(params)}
                                | {tuple(a.shape[1:]) for a in jax.tree.leaves(params)}),
        # Per device: the image, text and joint token activations [rows, L, hidden].
        "token_activations": [[rows, n, CFG.hidden_size] for n in (seq, txt, seq + txt)],
        "lengths": [seq, txt, seq + txt],
    }))


if __name__ == "__main__":
    {"numerics": numerics, "hlo": hlo}[sys.argv[1]]()
