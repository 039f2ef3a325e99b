"""Run on 8 simulated devices by tests/test_activation_sharding.py.

Compiles the sampling loop of a small FLUX with FSDP-sharded params and a
batch-sharded latent, with or without activation constraints, and prints the
shapes every collective produces and the parameter shapes (JSON).
"""

import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from prefgrpo_jax import program_analysis, sampling, sharding
from prefgrpo_jax.models import flux
from prefgrpo_jax.pipeline import make_velocity_fn


def main(constrained: bool) -> None:
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    cfg = flux.FluxConfig.tiny(hidden_size=128, num_heads=2, axes_dim=(16, 24, 24))
    graphdef, params = nnx.split(flux.abstract_transformer(cfg))
    shardings = sharding.param_shardings(params, mesh, min_size=1024)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    batch, seq, txt = 16, 64, 8
    bs, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    cond = {
        "img_ids": jax.ShapeDtypeStruct((batch, seq, 3), jnp.float32, sharding=bs),
        "txt": jax.ShapeDtypeStruct((batch, txt, cfg.context_dim), jnp.float32, sharding=bs),
        "txt_ids": jax.ShapeDtypeStruct((batch, txt, 3), jnp.float32, sharding=bs),
        "y": jax.ShapeDtypeStruct((batch, cfg.vec_dim), jnp.float32, sharding=bs),
        "guidance": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs),
    }
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=repl)
    config = sampling.SamplerConfig(num_steps=3, group_size=4)
    velocity = make_velocity_fn(graphdef)

    def lower():
        return sampling.sample_trajectory.lower(velocity, config, params, key, cond, (seq, cfg.in_channels))

    if constrained:
        with sharding.activation_sharding(mesh):
            compiled = lower().compile()
    else:
        compiled = lower().compile()
    print(json.dumps({
        "collectives": program_analysis.collective_shapes(compiled.as_text()),
        "param_shapes": [list(a.shape) for a in jax.tree.leaves(params)],
        "batch_per_device": batch // 8, "tokens": seq + txt, "seq": seq,
    }))


if __name__ == "__main__":
    main(sys.argv[1] == "constrained")
