"""Run in a subprocess on N simulated devices by tests/test_state.py.

  python tests/state_probe.py {sharded|old} FLUX_DIR

``sharded``: the state layer (weights read into their shardings, the train
state born sharded under jit). ``old``: the previous path (whole model on the
default device, cast, optimizer init, then ``device_put`` to the shardings).
Prints one JSON line: process peak-RSS growth, the model's fp32 size, and
whether every leaf was born with its final sharding.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefgrpo_jax import grpo, sharding
from prefgrpo_jax import state as state_lib
from prefgrpo_jax.config import base_config
from prefgrpo_jax.models import flux


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so
    the imports' own peak does not hide what loading needs."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(kind: str, flux_dir: str) -> None:
    config = base_config()
    config.sharding.fsdp_min_size = 1024
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    optimizer = optax.adamw(1e-4)
    jnp.zeros(()).block_until_ready()  # the backend is up before the baseline
    reset_peak_rss()
    baseline = rss_bytes("VmRSS")
    out: dict = {"devices": jax.device_count()}
    if kind == "sharded":
        model = flux.load_diffusers(flux_dir, dtype=jnp.float32, shardings=state_lib.sharding_fn(config, mesh))
        _, params = nnx.split(model)
        del model
        want_params = state_lib.tree_shardings(params, config, mesh)
        born_right = all(a.sharding == s for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)))
        _, shardings = state_lib.train_state_shardings(params, optimizer, config, mesh)
        state = state_lib.init_train_state(params, optimizer, shardings)
        out["params_born_sharded"] = born_right
        out["state_born_sharded"] = all(
            a.sharding == s for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
        # No device holds more of a sharded leaf than its shard.
        out["largest_device_fraction"] = max(
            max(math_prod(sh.data.shape) for sh in a.addressable_shards) / max(1, a.size)
            for a in jax.tree.leaves(state) if len(a.sharding.spec) and any(a.sharding.spec))
    else:
        model = flux.load_diffusers(flux_dir)  # whole, on the default device
        _, params = nnx.split(model)
        params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
        state = grpo.init_train_state(params, optimizer)
        state = jax.device_put(state, state_lib.tree_shardings(state, config, mesh))
    jax.block_until_ready(state)
    out["params_fp32_bytes"] = int(sum(a.size * 4 for a in jax.tree.leaves(state["params"])))
    out["rss_growth_bytes"] = rss_bytes("VmHWM") - baseline
    print(json.dumps(out))


def math_prod(shape) -> int:
    return int(np.prod(shape))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
