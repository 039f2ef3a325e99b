"""Memory of a GRPO train step, with and without remat, at two model sizes.

Two sources:

* ``compiled.memory_analysis()`` of the jitted train step (compile only, from
  abstract ``ShapeDtypeStruct`` params: nothing is allocated), for several
  group sizes G: argument (params + AdamW state + batch), output, alias
  (donated state) and temp (activations, gradients, workspace) bytes. The peak
  estimate is ``argument + output - alias + temp``. A line ``peak = a + b G``
  through the two largest G gives the largest G that fits a memory budget
  (see ``fit_group_budget``).
* The measured peak RSS of one real train step (at the largest G) in a
  subprocess per (model, remat), with the kernel's RSS high-water mark reset after setup and
  compilation, so that the step's own peak is separable from imports and XLA.

With ``timestep_chunk=1`` the train step scans over trained timesteps, so its
activation memory is that of one forward/backward over the G samples and does
not grow with the number of sampling steps S (only the stored trajectory,
``G (S + 1) L C`` floats, does); S is therefore kept small here.

At ``--size medium`` the same compile-only analysis is also run for FLUX.1-dev
itself (11.9B params) at the recipe's 720x720 (2025 image tokens, 512 text
tokens), G = 1 and 2: what one device would need, unsharded.
"""

from __future__ import annotations

import time
from typing import Any

from experiments import bench_common as bc
from prefgrpo_jax import program_analysis

GIB = 2**30
SIZES = {
    # One model at the smoke size: each train-step compile takes ~15 s on one thread.
    "tiny": dict(problems=[("tiny", (4, 4), 8)], groups=[1, 2],
                 run_group=2, steps=4, budget_gib=1.0, flux_dev=False),
    # Compile-only at G = 8 (also run for real) and 32: both activation-bound.
    "medium": dict(problems=[("medium", (16, 16), 32), ("large", (16, 16), 32)],
                   groups=[8, 32], run_group=8, steps=4, budget_gib=16.0, flux_dev=True),
}
# G = 1 for reference; the slope from G = 16 and 32, where activations (not the
# optimizer update's gradient-sized temporaries) set the peak even with remat.
FLUX_DEV = dict(problem=("flux_dev", (45, 45), 512), groups=[1, 16, 32], budget_gib=80.0)


def _setup(problem: bc.Problem, remat: bool, group: int, steps: int, abstract: bool):
    import jax
    import jax.numpy as jnp

    from prefgrpo_jax import grpo, sampling
    m = problem.model_kwargs()
    L, C = problem.num_img_tokens, m["in_channels"]
    if abstract:
        graphdef, params = bc.jax_abstract_flux(problem, remat=remat)
    else:
        graphdef, params = bc.jax_init_flux(problem, remat=remat)
    velocity_fn = bc.jax_velocity_fn(graphdef)
    sampler = sampling.SamplerConfig(num_steps=steps, eta=0.7, mode="flow", group_size=group)
    gcfg = grpo.GRPOConfig(clip_range=1e-4, timestep_fraction=0.6)
    opt = grpo.make_optimizer(1e-5, weight_decay=1e-4, max_grad_norm=1.0)
    step_fn = grpo.make_train_step(velocity_fn, sampler, gcfg, opt)
    cond = bc.jax_cond(bc.make_cond_np(problem, group))
    key = jax.random.key(0)
    batch = {
        "latents": jax.random.normal(key, (group, steps + 1, L, C)),
        "log_probs": jnp.zeros((group, steps)), "advantages": jnp.linspace(-1, 1, group),
        "cond": cond,
    }
    if abstract:
        state = jax.eval_shape(lambda p: grpo.init_train_state(p, opt), params)
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    else:
        state = grpo.init_train_state(params, opt)
    return step_fn, state, batch, key


def compile_worker(problem: dict, remat: bool, groups: list[int], steps: int) -> dict[str, Any]:
    """Compile-only memory analysis for each group size (nothing allocated)."""
    prob = bc.Problem.from_json(problem)
    out = []
    for g in groups:
        step_fn, state, batch, key = _setup(prob, remat, g, steps, abstract=True)
        t = time.perf_counter()
        compiled = step_fn.lower(state, batch, key).compile()
        out.append({"group": g, "compile_s": time.perf_counter() - t,
                    **program_analysis.memory_stats(compiled)})
    return {"per_group": out}


def analyse_worker(problem: dict, remat: bool, groups: list[int], run_group: int, steps: int,
                   reps: int) -> dict[str, Any]:
    """Compile-only analysis for ``groups`` (except ``run_group``), then one real
    train step at ``run_group`` (its compiled memory analysis completes the list)
    with the step's own peak RSS."""
    import jax
    prob = bc.Problem.from_json(problem)
    per_group = compile_worker(problem, remat, [g for g in groups if g != run_group],
                               steps)["per_group"]
    step_fn, state, batch, key = _setup(prob, remat, run_group, steps, abstract=False)
    rss_setup = bc.rss_now_mib()
    t = time.perf_counter()
    compiled = step_fn.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t
    stats = program_analysis.memory_stats(compiled)
    per_group = sorted(per_group + [{"group": run_group, "compile_s": compile_s, **stats}],
                       key=lambda r: r["group"])
    peak_setup = bc.reset_peak_rss()
    rss_before = bc.rss_now_mib()
    holder = {"state": state}

    def run():
        holder["state"], _ = step_fn(holder["state"], batch, key)
        jax.block_until_ready(holder["state"])
    timing = bc.timed(run, reps=reps)
    peak_steps = bc.peak_rss_mib()
    return {"per_group": per_group, "run": {
        "group": run_group, "memory_analysis": stats, "compile_s": compile_s,
        "rss_after_setup_mib": rss_setup, "peak_rss_setup_compile_mib": peak_setup,
        "rss_before_steps_mib": rss_before, "peak_rss_steps_mib": peak_steps,
        "step_peak_increase_mib": peak_steps - rss_before, "timing": timing}}


def fit_group_budget(per_group: list[dict], budget_bytes: float) -> dict[str, Any]:
    """Largest G with ``peak(G) <= budget`` from compile-only peaks at a few G.

    The peak of a train step is the larger of two phases: forward/backward
    (activations, growing linearly with G) and the optimizer update (gradients
    and AdamW temporaries, independent of G). At small G (or with remat) the
    second one can hide the first, so the line ``peak = a + b G`` goes through
    the two *largest* measured G (the activation-bound regime); the budget's
    G is then ``(budget - a) / b``.
    """
    pts = sorted(per_group, key=lambda r: r["group"])
    if len(pts) < 2:
        return {"bytes_per_sample": None, "intercept_bytes": None, "max_group": None,
                "temp_bytes_per_sample": None,
                "budget_bytes": budget_bytes}
    (g0, r0), (g1, r1) = ((r["group"], r) for r in pts[-2:])
    b = (r1["peak_estimate_bytes"] - r0["peak_estimate_bytes"]) / (g1 - g0)
    a = r1["peak_estimate_bytes"] - b * g1
    tb = (r1["temp_bytes"] - r0["temp_bytes"]) / (g1 - g0)
    if b <= 0:  # still flat at the largest G: activation slope not resolved
        gmax = None
    elif budget_bytes < min(r["peak_estimate_bytes"] for r in pts):
        gmax = 0  # not even the smallest measured G fits
    else:
        gmax = max(0, int((budget_bytes - a) // b))
    return {"intercept_bytes": float(a), "bytes_per_sample": float(b),
            "temp_bytes_per_sample": float(tb), "fit_groups": [g0, g1],
            "budget_bytes": budget_bytes, "max_group": gmax}


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    started, load0 = time.time(), bc.loadavg()
    s = {**SIZES[size], **(overrides or {})}
    budget = s["budget_gib"] * GIB
    entries = []
    problems = [bc.Problem(n, tuple(gr), t) for n, gr, t in s["problems"]]
    for prob in problems:
        for remat in (False, True):
            r = bc.run_worker("experiments.bench_memory:analyse_worker",
                              dict(problem=prob.to_json(), remat=remat, groups=s["groups"],
                                   run_group=s["run_group"], steps=s["steps"], reps=1),
                              threads=threads)
            entries.append({"model": prob.model, "params": prob.describe()["params"],
                            "remat": remat, "compile_only": r["per_group"],
                            "fit": fit_group_budget(r["per_group"], budget), "run": r["run"],
                            "peak_rss_process_mib": r["_proc"]["peak_rss_mib"]})
    flux_dev = None
    if s.get("flux_dev"):
        fp = bc.Problem(*FLUX_DEV["problem"][:1], tuple(FLUX_DEV["problem"][1]),
                        FLUX_DEV["problem"][2])
        flux_dev = []
        for remat in (False, True):
            comp = bc.run_worker("experiments.bench_memory:compile_worker",
                                 dict(problem=fp.to_json(), remat=remat,
                                      groups=FLUX_DEV["groups"], steps=s["steps"]),
                                 threads=threads)
            flux_dev.append({"remat": remat, "compile_only": comp["per_group"],
                             "fit": fit_group_budget(comp["per_group"],
                                                     FLUX_DEV["budget_gib"] * GIB)})
    payload = {
        "config": {"size": size, **s, "dtype": "float32 params, AdamW state and compute",
                   "timestep_chunk": 1, "models": [p.describe() for p in problems]},
        "threads": bc.thread_settings_doc(threads),
        "results": entries, "flux_dev_compile_only": flux_dev,
    }

    def gib(x):
        return x / GIB
    g_run = s["run_group"]
    rows = []
    for e in entries:
        ma = next(r for r in e["compile_only"] if r["group"] == g_run)
        rows.append([e["model"], f"{e['params']:,}", "on" if e["remat"] else "off",
                     gib(ma["argument_bytes"]), gib(ma["temp_bytes"]),
                     gib(ma["peak_estimate_bytes"]), e["run"]["peak_rss_steps_mib"] / 1024,
                     e["run"]["step_peak_increase_mib"] / 1024,
                     (e["fit"]["bytes_per_sample"] or float("nan")) / 2**20,
                     e["fit"]["max_group"]])
    md = [
        f"One GRPO train step (G={g_run} samples, S={s['steps']} sampling steps, "
        f"timestep_chunk=1), fp32, {threads} threads. Compile-only memory analysis for "
        f"G in {s['groups']}; measured RSS of a real step at G={g_run}; largest G for a "
        f"{s['budget_gib']:g} GiB budget from the line peak = a + b G through the two "
        "largest G (XLA peak estimate; '-' = peak still flat in G, i.e. set by the "
        "optimizer update, not by activations).\n",
        bc.md_table(["model", "params", "remat", f"args GiB (G={g_run})",
                     f"temp GiB (G={g_run})", f"XLA peak est. GiB (G={g_run})",
                     "measured peak RSS GiB (step)", "step RSS increase GiB",
                     "MiB per extra sample (fit)", f"max G in {s['budget_gib']:g} GiB"], rows),
    ]
    if flux_dev:
        rows = []
        for e in flux_dev:
            for r in e["compile_only"]:
                rows.append(["on" if e["remat"] else "off", r["group"], gib(r["argument_bytes"]),
                             gib(r["temp_bytes"]), gib(r["peak_estimate_bytes"]),
                             r["compile_s"]])
        md += [
            "",
            "FLUX.1-dev (11.9B) at 720x720 (2025 image + 512 text tokens), compile-only on "
            "the CPU backend (buffer sizes, not a GPU/TPU allocator), fp32 params + AdamW: "
            "what one device would hold unsharded.\n",
            bc.md_table(["remat", "G", "args GiB", "temp GiB", "peak est. GiB", "compile s"],
                        rows),
            "",
            "Activation memory per extra sample (slope between the two largest G): "
            + ", ".join(f"remat {'on' if e['remat'] else 'off'}: "
                        + (f"{e['fit']['temp_bytes_per_sample'] / GIB:.2f} GiB"
                           if e["fit"]["temp_bytes_per_sample"] is not None else "-")
                        for e in flux_dev)
            + f". Largest G in {FLUX_DEV['budget_gib']:g} GiB unsharded: "
            + ", ".join(f"remat {'on' if e['remat'] else 'off'}: {e['fit']['max_group']}"
                        for e in flux_dev)
            + " -- fp32 params + AdamW state alone (args) exceed one 80 GB device, so they "
              "must be sharded (FSDP) and/or kept in bf16; the per-sample slope is what each "
              "device adds per sample on top.",
        ]
    bc.write_results("memory", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload
