"""Weak scaling of the sampling trajectory over 1, 2, 4, 8 simulated CPU devices.

One subprocess per device count N with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; a 1-D mesh ``("data",)``
over the N devices, params replicated (``NamedSharding(mesh, P())``), the
batch (N x per-device images, whole groups per device) sharded over ``data``
(``NamedSharding(mesh, P("data"))``), the trajectory jitted with those
in/out shardings. Same per-device batch for every N (weak scaling): on real
devices the step time would stay flat.

Caveat, stated in the results too: simulated CPU devices are threads of one
process sharing this machine's cores, and a single device already uses all of
them, so the work per core grows with N and the step time rises ~linearly.
What this benchmark does show is that the sharded program compiles, splits
the batch without collectives inside the denoising loop, and that total
throughput stays flat (no partitioning overhead).
"""

from __future__ import annotations

import re
import time
from typing import Any

from experiments import bench_common as bc

SIZES = {
    "tiny": dict(problem="tiny", per_device=1, steps=3, devices=[1, 2], reps=2),
    "medium": dict(problem="medium", per_device=2, steps=8, devices=[1, 2, 4, 8], reps=2),
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def worker(problem: dict, per_device: int, steps: int, reps: int, n_devices: int) -> dict[str, Any]:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from prefgrpo_jax import sampling
    devices = jax.devices()
    assert len(devices) == n_devices, (devices, n_devices)
    mesh = Mesh(np.array(devices), ("data",))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    prob = bc.Problem.from_json(problem)
    batch = n_devices * per_device
    graphdef, params = bc.jax_init_flux(prob)
    params = jax.device_put(params, repl)
    cond = jax.device_put(bc.jax_cond(bc.make_cond_np(prob, batch)), data)
    velocity_fn = bc.jax_velocity_fn(graphdef)
    latent_shape = (prob.num_img_tokens, prob.model_kwargs()["in_channels"])
    config = sampling.SamplerConfig(num_steps=steps, eta=0.7, mode="flow",
                                    group_size=per_device)

    def traj(params, key, cond):
        return sampling.sample_trajectory(velocity_fn, config, params, key, cond, latent_shape)
    fn = jax.jit(traj, in_shardings=(repl, repl, data),
                 out_shardings=sampling.Trajectory(latents=data, log_probs=data, sigmas=repl, x0_pred=data))
    key = jax.random.key(0)
    t = time.perf_counter()
    compiled = fn.lower(params, key, cond).compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()
    collectives = {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
    out = fn(params, key, cond)
    jax.block_until_ready(out)
    timing = bc.timed(lambda: jax.block_until_ready(fn(params, key, cond)), reps=reps)
    return {
        "n_devices": n_devices, "batch": batch, "compile_s": compile_s, "timing": timing,
        "collectives_in_hlo": collectives,
        "latents_shard_shape": list(out.latents.sharding.shard_shape(out.latents.shape)),
        "log_probs_finite": bool(np.isfinite(np.asarray(out.log_probs)).all()),
    }


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    started, load0 = time.time(), bc.loadavg()
    s = {**SIZES[size], **(overrides or {})}
    prob = bc.PROBLEMS[s["problem"]]
    results = []
    for n in s["devices"]:
        r = bc.run_worker("experiments.bench_scaling:worker",
                          dict(problem=prob.to_json(), per_device=s["per_device"],
                               steps=s["steps"], reps=s["reps"], n_devices=n),
                          threads=threads, device_count=n)
        results.append(r)
    t1 = results[0]["timing"]["steady_s"]
    rows = []
    for r in results:
        t = r["timing"]["steady_s"]
        r["weak_scaling_efficiency"] = t1 / t
        r["step_time_s"] = t / s["steps"]
        r["images_per_s"] = r["batch"] / t
        rows.append([r["n_devices"], r["batch"], "x".join(map(str, r["latents_shard_shape"])),
                     t, r["step_time_s"], r["images_per_s"], r["weak_scaling_efficiency"],
                     r["timing"]["cpu_util"], r["compile_s"],
                     sum(r["collectives_in_hlo"].values())])
    payload = {
        "config": {"size": size, **s, "mesh": "1-D ('data',)", "params": "replicated",
                   "batch": "sharded over data", "model": prob.describe()},
        "threads": {**bc.thread_settings_doc(threads),
                    "note": f"all simulated devices share the same {threads} CPU cores"},
        "results": results,
    }
    md = [
        f"Weak scaling: {s['per_device']} images per simulated CPU device, S={s['steps']} SDE "
        f"steps, model `{prob.model}`, fp32, {threads} threads. All N simulated devices are "
        f"threads of one process on the same {threads} cores, and one device alone already "
        "uses them all for intra-op parallelism; so N devices do N x the work on the same "
        "cores: per-device step time grows ~N (efficiency ~1/N is the ceiling here, not a "
        "defect) and what to look at is the total images/s (flat = the sharded program adds "
        "no overhead) and the collectives (none inside the denoising loop). Real "
        "multi-device scaling needs real devices.\n",
        bc.md_table(["N devices", "batch", "latent shard / device", "trajectory s",
                     "s / SDE step", "images/s (total)", "efficiency t1/tN", "CPU util",
                     "compile s", "collectives in HLO"], rows),
    ]
    bc.write_results("scaling", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload
