"""MFU: model FLOPs per step over step time, vs this machine's measured matmul peak.

FLOPs of a GRPO train step and of a sampling trajectory are taken three ways:

* ``jaxpr``: every ``dot_general`` in the step's jaxpr, ``scan`` bodies times
  their trip count (``program_analysis.jaxpr_flops``) -- the number used for MFU;
* ``xla_cost_analysis``: ``jax.jit(...).lower(...).compile().cost_analysis()``.
  XLA counts a while-loop body once regardless of its trip count, and both the
  trajectory and the train step are scans (over steps / timestep chunks and over
  the scanned blocks), so this undercounts; reported for completeness;
* ``analytic``: ``bench_common.forward_flops`` from the config (forward; the
  train step counts forward + backward = 3 x forward).

The peak is measured in the same run: ``jnp.dot`` of two large square
matrices, fp32 and bf16, best of several calls. MFU = (jaxpr FLOPs / steady
step time) / fp32 peak (the step runs in fp32).
"""

from __future__ import annotations

import functools
from typing import Any

from experiments import bench_common as bc
from prefgrpo_jax import program_analysis

SIZES = {
    "tiny": dict(problem="tiny", group=2, steps=4, reps=2, matmul_n=512),
    "medium": dict(problem="medium", group=8, steps=25, reps=2, matmul_n=2048),
}


def matmul_peak(n: int, dtype_name: str, reps: int = 10) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(dtype_name)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    res = bc.timed(lambda: f(a, b).block_until_ready(), reps=reps)
    flops = 2.0 * n**3
    return {"n": n, "dtype": dtype_name, "best_gflops": flops / res["steady_min_s"] / 1e9,
            "median_gflops": flops / res["steady_s"] / 1e9, "cpu_util": res["cpu_util"]}


def worker(problem: dict, group: int, steps: int, reps: int, matmul_n: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from prefgrpo_jax import grpo, sampling
    prob = bc.Problem.from_json(problem)
    graphdef, params = bc.jax_init_flux(prob)
    velocity_fn = bc.jax_velocity_fn(graphdef)
    m = prob.model_kwargs()
    L, C = prob.num_img_tokens, m["in_channels"]
    cond = bc.jax_cond(bc.make_cond_np(prob, group))
    fwd1 = bc.forward_flops(m, 1, L, prob.text_len)["total"]
    out: dict[str, Any] = {}

    # --- sampling trajectory (forward only).
    sampler = sampling.SamplerConfig(num_steps=steps, eta=0.7, mode="flow", group_size=group)
    key = jax.random.key(0)
    traj_fn = functools.partial(sampling.sample_trajectory, velocity_fn, sampler,
                                latent_shape=(L, C))
    compiled = sampling.sample_trajectory.lower(velocity_fn, sampler, params, key, cond,
                                                (L, C)).compile()
    jflops = program_analysis.jaxpr_flops(jax.make_jaxpr(traj_fn)(params, key, cond))
    timing = bc.timed(lambda: jax.block_until_ready(traj_fn(params, key, cond)), reps=reps)
    traj = traj_fn(params, key, cond)
    out["sampling"] = {
        "flops_jaxpr": jflops["dot_flops"], "unknown_while_loops": jflops["unknown_while_loops"],
        "flops_xla_cost_analysis": bc.xla_flops(compiled),
        "flops_analytic": fwd1 * group * steps, "timing": timing,
    }

    # --- one GRPO train step (forward + backward over the trained timesteps).
    gcfg = grpo.GRPOConfig(clip_range=1e-4, timestep_fraction=0.6)
    k = gcfg.num_train_timesteps(steps)
    opt = grpo.make_optimizer(1e-5, weight_decay=1e-4, max_grad_norm=1.0)
    batch = grpo.rollout_batch(traj, jnp.linspace(-1.0, 1.0, group), cond)
    state = grpo.init_train_state(params, opt)
    step_fn = grpo.make_train_step(velocity_fn, sampler, gcfg, opt)
    raw_step = grpo.make_train_step(velocity_fn, sampler, gcfg, opt, jit=False)
    jflops = program_analysis.jaxpr_flops(jax.make_jaxpr(raw_step)(state, batch, key))
    compiled = step_fn.lower(state, batch, key).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = step_fn(holder["state"], batch, key)
        jax.block_until_ready(holder["state"])
    timing = bc.timed(run, reps=reps)
    out["training"] = {
        "flops_jaxpr": jflops["dot_flops"], "unknown_while_loops": jflops["unknown_while_loops"],
        "flops_xla_cost_analysis": bc.xla_flops(compiled),
        "flops_analytic": 3 * fwd1 * group * k, "train_timesteps": k, "timing": timing,
    }

    # --- the machine's matmul peak, same process, same threads.
    out["peak"] = {d: matmul_peak(matmul_n, d) for d in ("float32", "bfloat16")}
    peak32 = out["peak"]["float32"]["best_gflops"] * 1e9
    peak16 = out["peak"]["bfloat16"]["best_gflops"] * 1e9
    for name in ("sampling", "training"):
        r = out[name]
        achieved = r["flops_jaxpr"] / r["timing"]["steady_s"]
        r.update(achieved_gflops=achieved / 1e9, mfu_vs_fp32_peak=achieved / peak32,
                 mfu_vs_bf16_peak=achieved / peak16,
                 jaxpr_over_xla_flops=(r["flops_jaxpr"] / r["flops_xla_cost_analysis"]
                                        if r["flops_xla_cost_analysis"] else None))
    return out


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    started, load0, s, prob, _ = bc.run_setup(SIZES, size, overrides, None)
    r = bc.run_worker("experiments.bench_mfu:worker",
                      dict(problem=prob.to_json(), group=s["group"], steps=s["steps"],
                           reps=s["reps"], matmul_n=s["matmul_n"]), threads=threads)
    payload = {
        "config": {"size": size, **s, "dtype": "float32", "model": prob.describe()},
        "threads": bc.thread_settings_doc(threads),
        "peak": r["peak"], "sampling": r["sampling"], "training": r["training"],
        "raw": r,
    }
    rows = []
    for name, what in (("sampling", f"trajectory: G={s['group']} x S={s['steps']} forwards"),
                       ("training", f"train step: G={s['group']} x "
                                    f"{r['training'].get('train_timesteps')} fwd+bwd + AdamW")):
        x = r[name]
        rows.append([what, x["flops_jaxpr"] / 1e9, x["flops_analytic"] / 1e9,
                     (x["flops_xla_cost_analysis"] or float("nan")) / 1e9,
                     x["timing"]["steady_s"], x["achieved_gflops"],
                     f"{100 * x['mfu_vs_fp32_peak']:.1f}%", f"{100 * x['mfu_vs_bf16_peak']:.1f}%"])
    p32, p16 = r["peak"]["float32"], r["peak"]["bfloat16"]
    md = [
        f"Model `{prob.model}` ({prob.describe()['params']:,} params, {prob.num_img_tokens} "
        f"image + {prob.text_len} text tokens), fp32 compute, {threads} threads.\n",
        f"Measured matmul peak (jnp.dot {p32['n']}x{p32['n']}, best of the timed calls): "
        f"fp32 {p32['best_gflops']:.1f} GFLOP/s (median {p32['median_gflops']:.1f}), "
        f"bf16 {p16['best_gflops']:.1f} GFLOP/s (median {p16['median_gflops']:.1f}).\n",
        bc.md_table(["step", "GFLOP (jaxpr)", "GFLOP (analytic)", "GFLOP (XLA cost_analysis)",
                     "steady s", "achieved GFLOP/s", "MFU vs fp32 peak", "MFU vs bf16 peak"],
                    rows),
        "",
        "XLA's cost_analysis counts every op (elementwise and optimizer included) but each "
        "while-loop (scan) body only once, whatever its trip count; jaxpr / XLA = "
        f"{r['training']['jaxpr_over_xla_flops']:.2f} (train step), "
        f"{r['sampling']['jaxpr_over_xla_flops']:.2f} (trajectory). MFU uses the jaxpr "
        "matmul count (scan bodies x trip count). Analytic = matmuls + attention from the "
        "config (train: 3 x forward; the jaxpr count is slightly lower because no gradient "
        "flows into the inputs of the first layers).",
    ]
    bc.write_results("mfu", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload
