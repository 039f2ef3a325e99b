"""Training benchmark: one GRPO update on one group's stored trajectories.

The batch is a real rollout: the PyTorch reference samples one group (G
images, S SDE steps, per-step log-probs) and turns random scores into
win-rate advantages; both frameworks then run one update on exactly that
batch and the same trained timesteps (``grpo.select_timesteps`` with the
step's key), from the same weights:

* ours: ``grpo.make_train_step`` (jitted; a scan over timestep chunks, the B
  samples of a chunk in one forward/backward; clipped surrogate; optax AdamW
  with grad-norm clipping), ``timestep_chunk=1``;
* torch batch=1 (the reference's form): for each sample, for each trained
  timestep, a forward with batch 1, the Flow-GRPO log-prob, the clipped loss
  divided by (accumulation x timesteps) and ``loss.backward()``; then
  ``clip_grad_norm_(1.0)`` and one ``AdamW`` step;
* torch batch=B: the same loop over timesteps, all B samples per forward.

Recipe settings: clip range 1e-4, 60% of the first S-1 steps trained,
AdamW lr 1e-5, weight decay 1e-4, max grad norm 1.0, fp32. Each framework runs
in its own subprocess; peak RSS is that process's ``ru_maxrss``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from experiments import bench_common as bc
from experiments import cpu_isa
from prefgrpo_jax import program_analysis

SIZES = {
    "tiny": dict(problem="tiny", group=2, steps=4, reps_jax=2, reps_torch=1),
    "medium": dict(problem="medium", group=8, steps=25, reps_jax=2, reps_torch=1),
}
ETA, CLIP_RANGE, FRACTION, LR, WD, MAX_GRAD_NORM, ADV_CLIP = 0.7, 1e-4, 0.6, 1e-5, 1e-4, 1.0, 5.0
# configs/tiny.py's CPU setting: the fastest backward pass on CPU (profile.md).
JAX_REMAT_POLICY = "dots_with_no_batch_dims_saveable"


def num_train_timesteps(steps: int) -> int:
    return max(1, int(FRACTION * (steps - 1)))  # == GRPOConfig.num_train_timesteps


# ---------------------------------------------------------------------------
# Workers.


def prepare_worker(problem: dict, group: int, steps: int, ckpt_dir: str,
                   threads: int) -> dict[str, Any]:
    """Builds the weights (diffusers dir) and one group's rollout with torch."""
    import numpy as np

    from experiments.bench_sampling import torch_trajectory
    torch = bc.torch_setup(threads)
    prob = bc.Problem.from_json(problem)
    model = bc.torch_build_flux(prob)
    model.save_pretrained(ckpt_dir, safe_serialization=True)
    cond_np = bc.make_cond_np(prob, group)
    cond_t = {k: torch.from_numpy(v) for k, v in cond_np.items()}
    gen = torch.Generator().manual_seed(0)
    latent_shape = (prob.num_img_tokens, prob.model_kwargs()["in_channels"])
    t = time.perf_counter()
    lat, lps = torch_trajectory(torch, model, cond_t, group, steps, bc.sd3_sigmas(steps), ETA,
                                gen, latent_shape, per_image=False)
    rollout_s = time.perf_counter() - t
    scores = np.random.default_rng(0).standard_normal((1, group))
    adv = bc.win_rate_advantages_np(scores).reshape(-1)
    np.savez(Path(ckpt_dir) / "batch.npz", latents=lat.numpy(), log_probs=lps.numpy(),
             advantages=adv, **{f"cond_{k}": a for k, a in cond_np.items()})
    return {"rollout_s": rollout_s}


def torch_train_step(torch, model, opt, data: dict, idx, sigmas, per_sample: bool):
    """The reference's update; returns metrics of this step (pre-update params)."""
    lat, lp_old, adv = data["latents"], data["log_probs"], data["advantages"]
    cond_t = data["cond"]
    B, k = idx.shape
    sig = torch.from_numpy(sigmas)
    smax = float(sigmas[1])
    adv = torch.clamp(adv, -ADV_CLIP, ADV_CLIP)
    total_loss, ratio_sum = 0.0, 0.0

    def loss_of(x, x_next, ti, rows, logp_old, a, scale):
        s, sn = sig[ti].view(-1, 1, 1), sig[ti + 1].view(-1, 1, 1)
        v = bc.torch_velocity(model, x, sig[ti], cond_t, rows)
        _, lp = bc.torch_flow_sde_step(x, v, s, sn, smax, ETA, next_sample=x_next)
        ratio = torch.exp(lp - logp_old)
        unclipped = -a * ratio
        clipped = -a * torch.clamp(ratio, 1.0 - CLIP_RANGE, 1.0 + CLIP_RANGE)
        return torch.mean(torch.maximum(unclipped, clipped)) / scale, ratio

    if per_sample:
        for i in range(B):  # gradient accumulation over B samples of batch 1
            for j in range(k):
                ti = idx[i, j:j + 1]
                loss, ratio = loss_of(lat[i, ti], lat[i, ti + 1], ti, slice(i, i + 1),
                                      lp_old[i, ti], adv[i:i + 1], B * k)
                loss.backward()
                total_loss += float(loss)
                ratio_sum += float(ratio.sum())
    else:
        rows = torch.arange(B)
        for j in range(k):
            ti = idx[:, j]
            loss, ratio = loss_of(lat[rows, ti], lat[rows, ti + 1], ti, slice(None),
                                  lp_old[rows, ti], adv, k)
            loss.backward()
            total_loss += float(loss)
            ratio_sum += float(ratio.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": total_loss, "grad_norm": float(grad_norm), "ratio_mean": ratio_sum / (B * k)}


def torch_worker(ckpt_dir: str, steps: int, reps: int, threads: int,
                 per_sample: bool) -> dict[str, Any]:
    import diffusers
    import numpy as np
    torch = bc.torch_setup(threads)
    model = diffusers.FluxTransformer2DModel.from_pretrained(ckpt_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=WD)
    npz = np.load(Path(ckpt_dir) / "batch.npz")
    data = {k: torch.from_numpy(npz[k]) for k in ("latents", "log_probs", "advantages")}
    data["cond"] = {k[5:]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith("cond_")}
    idx = torch.from_numpy(np.load(Path(ckpt_dir) / "idx.npy")).long()
    sigmas = bc.sd3_sigmas(steps)
    rss0 = bc.rss_now_mib()
    setup_peak = bc.reset_peak_rss()
    rss1 = bc.rss_now_mib()
    first_metrics: dict[str, float] = {}

    def run():
        m = torch_train_step(torch, model, opt, data, idx, sigmas, per_sample)
        if not first_metrics:
            first_metrics.update(m)
    res = bc.timed(run, reps=reps)
    return {"timing": res, "first_step_metrics": first_metrics,
            "torch_num_threads": torch.get_num_threads(), "rss_after_setup_mib": rss0,
            "rss_before_steps_mib": rss1,
            "peak_rss_setup_mib": setup_peak, "peak_rss_steps_mib": bc.peak_rss_mib()}


def jax_worker(problem: dict, ckpt_dir: str, steps: int, reps: int,
               timestep_chunk: int = 1, remat_policy: str = JAX_REMAT_POLICY, lora_rank: int = 0,
               scan_unroll: int | bool = 1) -> dict[str, Any]:
    """Our train step; ``remat_policy`` is one of ``flux.REMAT_POLICIES`` or "off";
    ``lora_rank`` > 0: train rank-r adapters (alpha 2r, the reference's targets) on
    the frozen loaded weights instead of the weights themselves; ``scan_unroll``:
    the model's ``scan_unroll`` (its scans over the blocks)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from prefgrpo_jax import grpo, lora, sampling
    from prefgrpo_jax.models import flux
    from prefgrpo_jax.pipeline import make_velocity_fn

    prob = bc.Problem.from_json(problem)
    remat = remat_policy != "off"
    model = flux.load_diffusers(ckpt_dir, remat=remat,
                                remat_policy=remat_policy if remat else JAX_REMAT_POLICY)
    assert model.cfg == flux.FluxConfig(**prob.model_kwargs()), model.cfg
    model.scan_unroll = scan_unroll
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = None
    if lora_rank:
        spec = flux.LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank, targets=lora.REFERENCE_TARGETS)
        graphdef, abstract, _ = lora.split(lora.abstract_model(model, spec))
        params, frozen = lora.init_adapters(abstract, jax.random.key(0)), params
        velocity_fn = make_velocity_fn(graphdef)
    else:
        velocity_fn = bc.jax_velocity_fn(graphdef)
    del model
    npz = np.load(Path(ckpt_dir) / "batch.npz")
    cond = bc.jax_cond({k[5:]: npz[k] for k in npz.files if k.startswith("cond_")})
    batch = {"latents": jnp.asarray(npz["latents"]), "log_probs": jnp.asarray(npz["log_probs"]),
             "advantages": jnp.asarray(npz["advantages"]), "cond": cond}
    B = batch["latents"].shape[0]
    sampler = sampling.SamplerConfig(num_steps=steps, eta=ETA, mode="flow", group_size=B)
    gcfg = grpo.GRPOConfig(clip_range=CLIP_RANGE, timestep_fraction=FRACTION,
                           timestep_chunk=timestep_chunk)
    k = gcfg.num_train_timesteps(steps)
    assert k == num_train_timesteps(steps)
    opt = grpo.make_optimizer(LR, weight_decay=WD, max_grad_norm=MAX_GRAD_NORM)
    state = grpo.init_train_state(params, opt)
    step_fn = grpo.make_train_step(velocity_fn, sampler, gcfg, opt)
    key = jax.random.key(1)
    idx = np.asarray(grpo.select_timesteps(key, B, steps, k))
    np.save(Path(ckpt_dir) / "idx.npy", idx)
    rss0 = bc.rss_now_mib()

    t = time.perf_counter()
    lowered = step_fn.lower(state, batch, key, None, frozen)
    trace_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    setup_peak = bc.reset_peak_rss()  # imports + weights + XLA compilation
    rss1 = bc.rss_now_mib()
    first_metrics: dict[str, float] = {}
    holder = {"state": state}

    def run():
        new_state, metrics = step_fn(holder["state"], batch, key, None, frozen)
        jax.block_until_ready(new_state)
        holder["state"] = new_state
        if not first_metrics:
            first_metrics.update({m: float(metrics[m]) for m in
                                  ("loss", "grad_norm", "ratio_mean", "clip_fraction")})
    res = bc.timed(run, reps=reps)
    res.update(trace_lower_s=trace_s, compile_s=compile_s,
               first_call_total_s=trace_s + compile_s + res["first_call_s"])
    return {"timing": res, "first_step_metrics": first_metrics, "train_timesteps": k,
            "timestep_chunk": timestep_chunk, "lora_rank": lora_rank,
            "trained_params": int(sum(a.size for a in jax.tree.leaves(state["params"]))),
            "optimizer_state_mib": sum(a.nbytes for a in jax.tree.leaves(state["opt_state"])) / 2**20,
            "rss_after_setup_mib": rss0,
            "rss_before_steps_mib": rss1,
            "peak_rss_setup_mib": setup_peak, "peak_rss_steps_mib": bc.peak_rss_mib(),
            "memory_analysis": program_analysis.memory_stats(compiled)}


# ---------------------------------------------------------------------------


def _measure(prob: bc.Problem, s: dict[str, Any], threads: int, isa: str) -> dict[str, Any]:
    """The three implementations on one ISA: table rows, speed-ups, raw worker output."""
    import tempfile
    G, S = s["group"], s["steps"]
    k = num_train_timesteps(S)
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        ckpt = str(Path(tmp) / "transformer")
        worker = functools.partial(bc.run_worker, threads=threads, isa=isa)
        prep = worker("experiments.bench_training:prepare_worker",
                      dict(problem=prob.to_json(), group=G, steps=S, ckpt_dir=ckpt,
                           threads=threads))
        j = worker("experiments.bench_training:jax_worker",
                   dict(problem=prob.to_json(), ckpt_dir=ckpt, steps=S, reps=s["reps_jax"]))
        tb = worker("experiments.bench_training:torch_worker",
                    dict(ckpt_dir=ckpt, steps=S, reps=s["reps_torch"], threads=threads,
                         per_sample=False))
        t1 = worker("experiments.bench_training:torch_worker",
                    dict(ckpt_dir=ckpt, steps=S, reps=s["reps_torch"], threads=threads,
                         per_sample=True))
    transitions = G * k  # (sample, timestep) pairs forwarded + backpropagated per update

    def row(name, r):
        tm = r["timing"]
        return {"isa": isa, "impl": name, "steady_s": tm["steady_s"],
                "samples_per_s": G / tm["steady_s"],
                "transitions_per_s": transitions / tm["steady_s"],
                "first_call_s": tm.get("first_call_total_s", tm["first_call_s"]),
                "compile_s": tm.get("compile_s"), "cpu_util": tm["cpu_util"],
                "peak_rss_mib": r["_proc"]["peak_rss_mib"],
                "peak_rss_steps_mib": r["peak_rss_steps_mib"],
                "rss_after_setup_mib": r["rss_after_setup_mib"],
                "rss_before_steps_mib": r["rss_before_steps_mib"],
                "isa_used": r["_proc"]["isa"],
                **{f"first_{m}": v for m, v in r["first_step_metrics"].items()}}
    rows = [row(f"jax train_step (jit, scan over timesteps, batch=B, remat {JAX_REMAT_POLICY})", j),
            row("torch batch=B (loop over timesteps)", tb),
            row("torch batch=1 (reference: loop over samples x timesteps)", t1)]
    ratios = {"jax_speedup_vs_torch_batchB": tb["timing"]["steady_s"] / j["timing"]["steady_s"],
              "jax_speedup_vs_torch_batch1": t1["timing"]["steady_s"] / j["timing"]["steady_s"]}
    return {"rows": rows, "ratios": ratios, "rollout_s_torch_batchG": prep["rollout_s"],
            "raw": {"prepare": prep, "jax": j, "torch_batchB": tb, "torch_batch1": t1}}


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None,
        isas: tuple[str, ...] | None = None) -> dict[str, Any]:
    started, load0, s, prob, isas = bc.run_setup(SIZES, size, overrides, isas)
    G, S = s["group"], s["steps"]
    k = num_train_timesteps(S)
    transitions = G * k
    by_isa = {isa: _measure(prob, s, threads, isa) for isa in isas}
    rows = [r for m in by_isa.values() for r in m["rows"]]
    fwd = bc.forward_flops(prob.model_kwargs(), 1, prob.num_img_tokens, prob.text_len)["total"]
    payload = {
        "config": {"size": size, **s, "train_timesteps": k, "transitions_per_update": transitions,
                   "eta": ETA, "clip_range": CLIP_RANGE, "timestep_fraction": FRACTION,
                   "lr": LR, "weight_decay": WD, "max_grad_norm": MAX_GRAD_NORM,
                   "jax_remat_policy": JAX_REMAT_POLICY, "dtype": "float32", "model": prob.describe(),
                   "analytic_train_flops_per_update": 3 * fwd * transitions, "isas": list(isas)},
        "threads": bc.thread_settings_doc(threads),
        "results": rows,
        "ratios": {isa: m["ratios"] for isa, m in by_isa.items()},
        "rollout_s_torch_batchG": {isa: m["rollout_s_torch_batchG"] for isa, m in by_isa.items()},
        "raw": {isa: m["raw"] for isa, m in by_isa.items()},
    }
    md = [
        f"One GRPO update: G={G} samples x {k} trained timesteps (of S={S}) = {transitions} "
        f"forward+backward transitions, then one AdamW step; model `{prob.model}` "
        f"({prob.describe()['params']:,} params, {prob.num_img_tokens} image + {prob.text_len} "
        f"text tokens), fp32, {threads} threads. Each framework in its own process. Peak RSS "
        "(process) covers imports, weights and (JAX) XLA compilation; peak RSS (steps) is the "
        "high-water mark of the update calls alone (kernel counter reset, freed heap trimmed, "
        "after setup and compilation); RSS after setup = resident once model, optimizer state "
        "and batch are loaded (before compiling); RSS before steps = after compilation. "
        + cpu_isa.note(isas) + "\n",
        bc.md_table(
            ["ISA", "implementation", "steady s / update", "samples/s", "transitions/s",
             "first call s", "compile s", "CPU util", "CPU s / update", "peak RSS MiB (process)",
             "peak RSS MiB (steps)", "RSS after setup MiB", "RSS before steps MiB"],
            [[r["isa"], r["impl"], r["steady_s"], r["samples_per_s"], r["transitions_per_s"],
              r["first_call_s"], r["compile_s"], r["cpu_util"], r["cpu_util"] * r["steady_s"],
              r["peak_rss_mib"], r["peak_rss_steps_mib"], r["rss_after_setup_mib"], r["rss_before_steps_mib"]]
             for r in rows]),
        "",
    ]
    md += [f"{isa}: JAX speed-up x{m['ratios']['jax_speedup_vs_torch_batchB']:.2f} vs torch "
           f"batch=B, x{m['ratios']['jax_speedup_vs_torch_batch1']:.2f} vs torch batch=1 "
           "(reference form).  " for isa, m in by_isa.items()]
    md += [
        "",
        "Same batch, same timesteps, same weights: first-update metrics agree "
        "(loss / grad-norm before clipping / mean ratio, torch log-probs from the rollout as "
        "old log-probs):\n",
        bc.md_table(["ISA", "implementation", "loss", "grad norm", "mean ratio"],
                    [[r["isa"], r["impl"], f"{r['first_loss']:.6g}",
                      f"{r['first_grad_norm']:.6g}", f"{r['first_ratio_mean']:.8f}"]
                     for r in rows]),
    ]
    bc.write_results("training", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload
