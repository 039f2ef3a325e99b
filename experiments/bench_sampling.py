"""Sampling benchmark: one group of G images through S SDE steps with log-probs.

Ours: ``sampling.sample_trajectory`` (one jitted ``lax.scan`` over the steps,
the whole group in one batch) with ``velocity_fn = nnx.merge(graphdef,
params)(x, img_ids, txt, txt_ids, t, y, guidance)``.

PyTorch reference: diffusers ``FluxTransformer2DModel`` (same weights: built
here, ``save_pretrained`` to a temp dir, loaded into ours with
``flux.load_diffusers``) driven by a Python loop over the steps with the
Flow-GRPO SDE step written in torch, under ``torch.no_grad()``, in two forms:

* ``torch batch=G``: one forward per step for the whole group;
* ``torch batch=1``: the reference's form (Pref-GRPO / DanceGRPO
  ``sample_reference_model``): one image at a time, a forward per image per step.

fp32, CPU, same thread count for both (see ``bench_common``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from experiments import bench_common as bc
from experiments import cpu_isa

SIZES = {
    "tiny": dict(problem="tiny", group=2, steps=3, reps_jax=2, reps_torch=1),
    "medium": dict(problem="medium", group=8, steps=25, reps_jax=3, reps_torch=2),
}
ETA = 0.7


# ---------------------------------------------------------------------------
# Workers (run in subprocesses).


def torch_trajectory(torch, model, cond_t, group: int, steps: int, sigmas, eta: float,
                     gen, latent_shape, per_image: bool):
    """The reference's sampling loop; returns (latents [G,S+1,L,C], log_probs [G,S])."""
    x0 = torch.randn((1, *latent_shape), generator=gen).repeat(group, 1, 1)  # same noise/group
    smax = float(sigmas[1])
    with torch.no_grad():
        if not per_image:
            x, lat, lps = x0, [x0], []
            for i in range(steps):
                s = torch.full((group, 1, 1), float(sigmas[i]))
                sn = torch.full((group, 1, 1), float(sigmas[i + 1]))
                v = bc.torch_velocity(model, x, torch.full((group,), float(sigmas[i])), cond_t)
                x, lp = bc.torch_flow_sde_step(x, v, s, sn, smax, eta, gen)
                lat.append(x)
                lps.append(lp)
            return torch.stack(lat, 1), torch.stack(lps, 1)
        all_lat, all_lp = [], []
        for g in range(group):  # reference: batch 1, image after image
            x, lat, lps = x0[g:g + 1], [x0[g:g + 1]], []
            for i in range(steps):
                s = torch.full((1, 1, 1), float(sigmas[i]))
                sn = torch.full((1, 1, 1), float(sigmas[i + 1]))
                v = bc.torch_velocity(model, x, torch.full((1,), float(sigmas[i])), cond_t,
                                      slice(g, g + 1))
                x, lp = bc.torch_flow_sde_step(x, v, s, sn, smax, eta, gen)
                lat.append(x)
                lps.append(lp)
            all_lat.append(torch.stack(lat, 1))
            all_lp.append(torch.stack(lps, 1))
        return torch.cat(all_lat, 0), torch.cat(all_lp, 0)


def torch_worker(problem: dict, group: int, steps: int, reps: int, ckpt_dir: str,
                 threads: int, variants: list[str]) -> dict[str, Any]:
    import numpy as np
    torch = bc.torch_setup(threads)
    prob = bc.Problem.from_json(problem)
    model = bc.torch_build_flux(prob)
    model.save_pretrained(ckpt_dir, safe_serialization=True)
    cond_np = bc.make_cond_np(prob, group)
    cond_t = {k: torch.from_numpy(v) for k, v in cond_np.items()}
    sigmas = bc.sd3_sigmas(steps)
    latent_shape = (prob.num_img_tokens, prob.model_kwargs()["in_channels"])
    gen = torch.Generator().manual_seed(0)

    # Parity data: the first step's velocity, next sample and log-prob.
    x = torch.randn((group, *latent_shape), generator=gen)
    with torch.no_grad():
        v = bc.torch_velocity(model, x, torch.full((group,), float(sigmas[0])), cond_t)
        s = torch.full((group, 1, 1), float(sigmas[0]))
        sn = torch.full((group, 1, 1), float(sigmas[1]))
        x_next, lp = bc.torch_flow_sde_step(x, v, s, sn, float(sigmas[1]), ETA, gen)
    np.savez(Path(ckpt_dir) / "parity.npz", x=x.numpy(), v=v.numpy(), x_next=x_next.numpy(),
             log_prob=lp.numpy(), **{f"cond_{k}": a for k, a in cond_np.items()})

    out: dict[str, Any] = {"torch_num_threads": torch.get_num_threads(),
                           "rss_after_setup_mib": bc.rss_now_mib()}
    for variant in variants:
        per_image = variant == "batch1"

        def run():
            return torch_trajectory(torch, model, cond_t, group, steps, sigmas, ETA, gen,
                                    latent_shape, per_image)
        lat, lps = run()
        assert lat.shape == (group, steps + 1, *latent_shape) and lps.shape == (group, steps)
        out[variant] = bc.timed(run, reps=reps)
        out[variant]["log_prob_finite"] = bool(torch.isfinite(lps).all())
    return out


def jax_worker(problem: dict, group: int, steps: int, reps: int, ckpt_dir: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from prefgrpo_jax import sampling
    from prefgrpo_jax.models import flux

    prob = bc.Problem.from_json(problem)
    model = flux.load_diffusers(ckpt_dir)
    assert model.cfg == flux.FluxConfig(**prob.model_kwargs()), model.cfg
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    velocity_fn = bc.jax_velocity_fn(graphdef)
    latent_shape = (prob.num_img_tokens, prob.model_kwargs()["in_channels"])

    # Parity with the torch model on the torch worker's inputs.
    par = np.load(Path(ckpt_dir) / "parity.npz")
    cond_np = {k[5:]: par[k] for k in par.files if k.startswith("cond_")}
    cond = bc.jax_cond(cond_np)
    sig = sampling.make_sigmas(steps)
    v = jax.jit(velocity_fn)(params, jnp.asarray(par["x"]), jnp.full((group,), sig[0]), cond)
    _, lp, _, _ = sampling.sde_step(jnp.asarray(par["x"]), v, sig[0], sig[1], eta=ETA,
                                    sigma_max=sig[1], next_sample=jnp.asarray(par["x_next"]))
    parity = {
        "velocity_max_abs_err": float(np.max(np.abs(np.asarray(v) - par["v"]))),
        "velocity_max_abs": float(np.max(np.abs(par["v"]))),
        "log_prob_max_abs_err": float(np.max(np.abs(np.asarray(lp) - par["log_prob"]))),
    }

    config = sampling.SamplerConfig(num_steps=steps, eta=ETA, mode="flow", group_size=group)
    key = jax.random.key(0)
    t = time.perf_counter()
    lowered = sampling.sample_trajectory.lower(velocity_fn, config, params, key, cond,
                                               latent_shape)
    trace_s = time.perf_counter() - t
    t = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t

    def run():
        traj = sampling.sample_trajectory(velocity_fn, config, params, key, cond, latent_shape)
        return jax.block_until_ready(traj)
    res = bc.timed(run, reps=reps)
    traj = run()
    assert traj.latents.shape == (group, steps + 1, *latent_shape)
    # jit reuses the executable compiled above, so the first call is run-only;
    # what a user waits for before the first group is trace + compile + first call.
    res.update(trace_lower_s=trace_s, compile_s=compile_s,
               first_call_total_s=trace_s + compile_s + res["first_call_s"],
               log_prob_finite=bool(jnp.all(jnp.isfinite(traj.log_probs))))
    return {"jax": res, "parity": parity, "devices": [str(d) for d in jax.devices()]}


# ---------------------------------------------------------------------------
# Orchestration.


def _measure(prob: bc.Problem, s: dict[str, Any], threads: int, isa: str) -> dict[str, Any]:
    """Both frameworks on one ISA: table rows, speed-ups, parity, raw worker output."""
    import tempfile
    G, S = s["group"], s["steps"]
    with tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
        ckpt = str(Path(tmp) / "transformer")
        t = bc.run_worker("experiments.bench_sampling:torch_worker",
                          dict(problem=prob.to_json(), group=G, steps=S, reps=s["reps_torch"],
                               ckpt_dir=ckpt, threads=threads, variants=["batchG", "batch1"]),
                          threads=threads, isa=isa)
        j = bc.run_worker("experiments.bench_sampling:jax_worker",
                          dict(problem=prob.to_json(), group=G, steps=S, reps=s["reps_jax"],
                               ckpt_dir=ckpt), threads=threads, isa=isa)

    def row(name, r, proc):
        return {"isa": isa, "impl": name, "steady_s": r["steady_s"],
                "images_per_s": G / r["steady_s"], "first_call_s": r["first_call_s"],
                "cpu_util": r["cpu_util"], "peak_rss_mib": proc["peak_rss_mib"],
                "isa_used": proc["isa"]}
    rows = [
        {**row("jax (jit, lax.scan, batch=G)", j["jax"], j["_proc"]),
         "first_call_s": j["jax"]["first_call_total_s"],
         "compile_s": j["jax"]["compile_s"], "trace_lower_s": j["jax"]["trace_lower_s"]},
        row("torch batch=G (per-step loop)", t["batchG"], t["_proc"]),
        row("torch batch=1 (reference: per image, per step)", t["batch1"], t["_proc"]),
    ]
    jax_s = j["jax"]["steady_s"]
    ratios = {
        "jax_speedup_vs_torch_batchG": t["batchG"]["steady_s"] / jax_s,
        "jax_speedup_vs_torch_batch1": t["batch1"]["steady_s"] / jax_s,
    }
    return {"rows": rows, "ratios": ratios, "parity": j["parity"], "raw": {"jax": j, "torch": t}}


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None,
        isas: tuple[str, ...] | None = None) -> dict[str, Any]:
    started, load0, s, prob, isas = bc.run_setup(SIZES, size, overrides, isas)
    G, S = s["group"], s["steps"]
    by_isa = {isa: _measure(prob, s, threads, isa) for isa in isas}
    rows = [r for m in by_isa.values() for r in m["rows"]]
    payload = {
        "config": {"size": size, **s, "eta": ETA, "mode": "flow", "schedule": "sd3, shift 3",
                   "dtype": "float32", "model": prob.describe(), "isas": list(isas),
                   "forward_flops_per_image": bc.forward_flops(
                       prob.model_kwargs(), 1, prob.num_img_tokens, prob.text_len)["total"]},
        "threads": bc.thread_settings_doc(threads),
        "results": rows,
        "ratios": {isa: m["ratios"] for isa, m in by_isa.items()},
        "parity": {isa: m["parity"] for isa, m in by_isa.items()},
        "raw": {isa: m["raw"] for isa, m in by_isa.items()},
    }
    md = [
        f"One group of G={G} images through S={S} Flow-GRPO SDE steps (eta {ETA}) with "
        f"per-step log-probs; model `{prob.model}` ({prob.describe()['params']:,} params, "
        f"{prob.num_img_tokens} image + {prob.text_len} text tokens), fp32, {threads} threads. "
        "steady = median of the timed calls after the first; JAX's first call = trace + "
        "compile + first run (compile also shown alone). " + cpu_isa.note(isas) + "\n",
        bc.md_table(
            ["ISA", "implementation", "steady s / group", "images/s", "first call s",
             "compile s", "CPU util", "CPU s / group", "peak RSS MiB"],
            [[r["isa"], r["impl"], r["steady_s"], r["images_per_s"], r["first_call_s"],
              r.get("compile_s"), r["cpu_util"], r["cpu_util"] * r["steady_s"],
              r["peak_rss_mib"]] for r in rows]),
        "",
    ]
    for isa, m in by_isa.items():
        ratios, parity = m["ratios"], m["parity"]
        md += [
            f"{isa}: JAX speed-up x{ratios['jax_speedup_vs_torch_batchG']:.2f} vs torch "
            f"batch=G, x{ratios['jax_speedup_vs_torch_batch1']:.2f} vs torch batch=1 (reference "
            f"form). Same-weights parity (first step, G images): max|v_jax - v_torch| = "
            f"{parity['velocity_max_abs_err']:.2e} (max|v| {parity['velocity_max_abs']:.2f}), "
            f"max|logp_jax - logp_torch| = {parity['log_prob_max_abs_err']:.2e}.",
            "",
        ]
    bc.write_results("sampling", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload
