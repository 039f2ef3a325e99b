"""Run on 4 simulated devices by tests/test_attention.py: splash attention
under ``sharding.activation_sharding`` (batch over "fsdp", heads over "tensor").

Prints JSON: the interpreted kernel's max error against einsum on sharded
inputs, and whether forward+backward lower for a 4-device TPU program with and
without the ``shard_map`` wrapper.
"""

import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from prefgrpo_jax import sharding
from prefgrpo_jax.models import flux


def _lower_for_tpu(fn, mesh, shape) -> str:
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None, "tensor")))

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)

    try:
        module = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(spec, spec, spec).mlir_module()
    except NotImplementedError as e:
        return f"error: {e}"
    return f"lowered: {module.count('tpu_custom_call')} Mosaic calls"


def main() -> None:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.device_put(jax.random.normal(key, (4, 200, 2, 32)), NamedSharding(mesh, P("fsdp", None, "tensor")))
               for key in keys)
    with sharding.activation_sharding(mesh):
        out = jax.jit(lambda *a: flux.splash_attention(*a, interpret=True))(q, k, v)
        wrapped = _lower_for_tpu(flux.splash_attention, mesh, (2, 4608, 24, 128))
        bare = _lower_for_tpu(lambda *a: flux._splash_local(*a, interpret=False), mesh, (2, 4608, 24, 128))
    print(json.dumps({
        "err": float(jnp.max(jnp.abs(out - flux.einsum_attention(q, k, v)))),
        "out_spec": str(out.sharding.spec),
        "wrapped": wrapped,
        "bare": bare,
    }))


if __name__ == "__main__":
    main()
