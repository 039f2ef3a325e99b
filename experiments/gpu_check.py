"""GPU check: sampling and train-step throughput, MFU and peak memory on one GPU.

One command, a few minutes on one GPU (budgeted under 8)::

    python -m experiments.gpu_check                 # on a GPU machine
    python -m experiments.gpu_check --smoke         # anywhere: tiny sizes, CPU is fine

Two models, both with bf16 compute on fp32 master weights (params cast inside
jit, as ``model.compute_dtype='bfloat16'``; SDE, log-probs and ratios fp32) and
``model.attention='cudnn'`` (cuDNN flash attention; ``auto`` in ``--smoke``,
which picks what the platform has):

* ``medium``: the CPU benchmarks' model (hidden 256, 2 + 4 blocks), 256 image +
  32 text tokens, G = 8, 25 steps;
* ``flux_slice``: FLUX.1-dev's width (hidden 3072, 24 heads, T5 4096, CLIP 768)
  with 2 double + 2 single blocks at 720 px (2025 image + 512 text tokens),
  G = 8, 25 steps: the per-block cost of the real model at the real sequence.

Per model: sampling images/s (one group's 25-step SDE trajectory with
log-probs), train-step samples/s (one GRPO update: G samples x the trained
timesteps, forward + backward + AdamW, remat as ``configs/flux.py``), MFU =
matmul FLOPs (the jaxpr count, scans unrolled) per second over the GPU's dense
bf16 peak (:data:`BF16_PEAK_TFLOPS`, looked up by ``device_kind``; also against
a measured ``jnp.dot`` peak), and the device's peak memory
(``memory_stats()['peak_bytes_in_use']``, cumulative over the run, so the
second model's figure is the run's peak). Results: ``<out>/gpu_check.{json,md}``
(``gpu_check_smoke`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Any

from experiments import bench_common as bc

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, by a
# substring of ``jax.Device.device_kind``; the first match wins (PCIe before SXM).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6", 918.0),
)

FLUX_SLICE = dict(bc.MODELS["flux_dev"], depth=2, depth_single=2)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: dict[str, Any]
    grid: tuple[int, int]  # packed image-token grid (720 px: 90x90 latent -> 45x45)
    text_len: int
    group: int
    steps: int

    def problem(self) -> bc.Problem:
        return _ModelProblem(self.name, self.grid, self.text_len, self.model)


@dataclasses.dataclass(frozen=True)
class _ModelProblem(bc.Problem):
    """A ``bench_common.Problem`` whose model is given, not looked up by name."""

    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


CASES = (
    Case("medium", bc.MODELS["medium"], (16, 16), 32, group=8, steps=25),
    Case("flux_slice", FLUX_SLICE, (45, 45), 512, group=8, steps=25),
)
SMOKE_CASES = (
    Case("medium", bc.MODELS["tiny"], (4, 4), 8, group=2, steps=3),
    Case("flux_slice", dict(bc.MODELS["tiny"], depth=2, depth_single=2), (6, 6), 8, group=2, steps=3),
)


def bf16_peak(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind, None when not in the table."""
    for name, tflops in BF16_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def peak_memory_bytes(device) -> int | None:
    """The device allocator's peak bytes in use so far (None where not reported, e.g. CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_case(case: Case, attention: str, reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from prefgrpo_jax import grpo, pipeline, program_analysis, sampling
    from prefgrpo_jax.models.flux import FluxConfig, FluxTransformer

    t_case = time.perf_counter()
    prob = case.problem()
    model = FluxTransformer(FluxConfig(**case.model), rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                            param_dtype=jnp.float32, remat=True,
                            remat_policy="dots_with_no_batch_dims_saveable", attention=attention)
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    velocity_fn = pipeline.make_velocity_fn(graphdef, jnp.bfloat16)
    L, C = prob.num_img_tokens, case.model["in_channels"]
    cond = bc.jax_cond(bc.make_cond_np(prob, case.group))
    sampler = sampling.SamplerConfig(num_steps=case.steps, eta=0.7, mode="flow", group_size=case.group,
                                     return_means=True)
    key = jax.random.key(0)
    traj_fn = jax.jit(functools.partial(sampling.sample_trajectory, velocity_fn, sampler, latent_shape=(L, C)))
    out: dict[str, Any] = {"params": sum(int(x.size) for x in jax.tree.leaves(params)),
                           "image_tokens": L, "text_tokens": case.text_len,
                           "group": case.group, "steps": case.steps}

    flops = program_analysis.jaxpr_flops(jax.make_jaxpr(traj_fn)(params, key, cond))["dot_flops"]
    timing = bc.timed(lambda: jax.block_until_ready(traj_fn(params, key, cond)), reps=reps)
    out["sampling"] = {"flops": flops, "timing": timing,
                       "images_per_s": case.group / timing["steady_s"]}
    traj = traj_fn(params, key, cond)

    gcfg = grpo.GRPOConfig(clip_range=1e-4, timestep_fraction=0.6, rationorm=True)
    k = gcfg.num_train_timesteps(case.steps)
    opt = grpo.make_optimizer(1e-5, weight_decay=1e-4, max_grad_norm=1.0)
    batch = grpo.with_timesteps(grpo.rollout_batch(traj, jnp.linspace(-1.0, 1.0, case.group), cond),
                                jax.random.key(1), num_steps=case.steps, k=k)
    del traj
    state = grpo.init_train_state(params, opt)
    raw_step = grpo.make_train_step(velocity_fn, sampler, gcfg, opt, jit=False)
    flops = program_analysis.jaxpr_flops(jax.make_jaxpr(raw_step)(state, batch, key))["dot_flops"]
    step_fn = grpo.make_train_step(velocity_fn, sampler, gcfg, opt)
    holder = {"state": state}

    def train_once():
        holder["state"], _ = step_fn(holder["state"], batch, key)
        jax.block_until_ready(holder["state"])

    timing = bc.timed(train_once, reps=reps)
    out["training"] = {"flops": flops, "timing": timing, "train_timesteps": k,
                       "samples_per_s": case.group / timing["steady_s"]}
    out["peak_memory_bytes"] = peak_memory_bytes(jax.devices()[0])
    out["wall_s"] = time.perf_counter() - t_case
    return out


def check(smoke: bool, reps: int) -> dict[str, Any]:
    import jax

    from experiments.bench_mfu import matmul_peak

    device = jax.devices()[0]
    if device.platform != "gpu" and not smoke:
        raise SystemExit(f"no GPU: JAX runs on {device.platform} ({device.device_kind}); run this on a "
                         "GPU machine, or with --smoke (tiny sizes) to check that it works")
    attention = "cudnn" if device.platform == "gpu" else "auto"
    cases = SMOKE_CASES if smoke else CASES
    peak_table = bf16_peak(device.device_kind)
    measured = matmul_peak(512 if smoke else 8192, "bfloat16")
    peak_measured = measured["best_gflops"] * 1e9
    results = {}
    for case in cases:
        print(f"[gpu_check] {case.name}: {case.group} images, {case.steps} steps, "
              f"{case.grid[0] * case.grid[1]} + {case.text_len} tokens", flush=True)
        r = run_case(case, attention, reps)
        for part in ("sampling", "training"):
            achieved = r[part]["flops"] / r[part]["timing"]["steady_s"]
            r[part]["achieved_tflops"] = achieved / 1e12
            r[part]["mfu_vs_table_peak"] = None if peak_table is None else achieved / peak_table
            r[part]["mfu_vs_measured_peak"] = achieved / peak_measured
        results[case.name] = r
        print(f"[gpu_check] {case.name}: {r['sampling']['images_per_s']:.3g} images/s, "
              f"{r['training']['samples_per_s']:.3g} samples/s, {r['wall_s']:.0f} s", flush=True)
    return {
        "device": {"platform": device.platform, "device_kind": device.device_kind,
                   "count": jax.device_count()},
        "smoke": smoke, "attention": attention, "compute_dtype": "bfloat16", "reps": reps,
        "bf16_peak_tflops_table": None if peak_table is None else peak_table / 1e12,
        "bf16_matmul_measured": measured,
        "cases": {c.name: {"model": c.model, "grid": list(c.grid), "text_len": c.text_len} for c in cases},
        "results": results,
    }


def markdown(payload: dict[str, Any]) -> str:
    d = payload["device"]
    table_peak = payload["bf16_peak_tflops_table"]
    mm = payload["bf16_matmul_measured"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = []
    for name, r in payload["results"].items():
        mem = r["peak_memory_bytes"]
        rows.append([
            name, f"{r['params'] / 1e6:.1f} M", f"{r['image_tokens']} + {r['text_tokens']}",
            r["sampling"]["images_per_s"], pct(r["sampling"]["mfu_vs_table_peak"]),
            r["training"]["samples_per_s"], pct(r["training"]["mfu_vs_table_peak"]),
            pct(r["training"]["mfu_vs_measured_peak"]),
            "n/a" if mem is None else f"{mem / 2**30:.2f}",
            r["sampling"]["timing"]["first_call_s"] + r["training"]["timing"]["first_call_s"],
        ])
    lines = [
        f"Device: {d['count']} x {d['platform']} ({d['device_kind']}); attention `{payload['attention']}`, "
        f"bf16 compute on fp32 master weights, remat (dots saved){', SMOKE sizes' if payload['smoke'] else ''}.\n",
        f"bf16 peak: {'not in the table' if table_peak is None else f'{table_peak:g} TFLOP/s (data sheet, dense)'}; "
        f"measured jnp.dot {mm['n']}^2: {mm['best_gflops'] / 1e3:.4g} TFLOP/s.\n",
        bc.md_table(["model", "params", "tokens (img + txt)", "sampling images/s", "sampling MFU",
                     "train samples/s", "train MFU", "train MFU vs measured dot", "peak memory GiB",
                     "compile + first calls s"], rows),
        "",
        "Sampling: one group of G through all SDE steps with log-probs; training: one GRPO update "
        "(G samples x 60% of the steps, forward + backward + AdamW). MFU counts matmul FLOPs from the "
        "jaxpr (scans unrolled). Peak memory is the allocator's peak so far, so the second row is the "
        "run's peak.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (seconds)")
    parser.add_argument("--out", default="experiments/results", help="results directory")
    parser.add_argument("--reps", type=int, default=3, help="timed calls after the first (compile) call")
    args = parser.parse_args(argv)
    started, load0 = time.time(), bc.loadavg()
    payload = check(args.smoke, args.reps)
    name = "gpu_check_smoke" if args.smoke else "gpu_check"
    path = bc.write_results(name, args.out, payload, markdown(payload), started=started, load_before=load0,
                            argv=argv, prog="python -m experiments.gpu_check")
    print(f"[gpu_check] done in {time.time() - started:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
