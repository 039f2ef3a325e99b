"""What moves our train step's time on each ISA: remat policy, timesteps per
forward, XLA CPU thread settings.

Usage::

    python -m experiments.train_variants [--isa both] [--variants a,b,...]
        [--reps 1] [--threads N] [--out experiments/results]

One GRPO batch at the training benchmark's medium size is prepared once (the
PyTorch rollout of ``bench_training.prepare_worker``); then
``bench_training.jax_worker`` runs once per (ISA, variant), each in a fresh
process. Writes ``train_variants.{json,md}``: steady time per update, CPU
utilisation, and the first update's loss / grad norm / mean ratio (a variant
that changed the math would show there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments import bench_common as bc
from experiments import bench_training, cpu_isa

# name -> (jax_worker keyword arguments, extra XLA flags)
VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "baseline": ({}, ()),
    "remat nothing_saveable": ({"remat_policy": "nothing_saveable"}, ()),
    "remat dots_saveable": ({"remat_policy": "dots_saveable"}, ()),
    "remat off": ({"remat_policy": "off"}, ()),
    "blocks unrolled": ({"scan_unroll": True}, ()),
    "timestep_chunk 2": ({"timestep_chunk": 2}, ()),
    "timestep_chunk 7": ({"timestep_chunk": 7}, ()),
    "xla_cpu_multi_thread_eigen=false": ({}, ("--xla_cpu_multi_thread_eigen=false",)),
    # An empty list of YNNPACK fusion kinds: XLA's matmuls go to its other kernels.
    "no YNNPACK fusions": ({}, ("--xla_cpu_experimental_ynn_fusion_type=",)),
    "concurrency-optimized scheduler off": (
        {}, ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train_variants",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=cpu_isa.ISA_CHOICES, default="both")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--size", choices=tuple(bench_training.SIZES), default="medium")
    parser.add_argument("--reps", type=int, default=1, help="timed updates after the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    started, load0 = time.time(), bc.loadavg()
    s = bench_training.SIZES[args.size]
    prob = bc.PROBLEMS[s["problem"]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_variants_") as tmp:
        ckpt = str(Path(tmp) / "transformer")
        bc.run_worker("experiments.bench_training:prepare_worker",
                      dict(problem=prob.to_json(), group=s["group"], steps=s["steps"],
                           ckpt_dir=ckpt, threads=args.threads), threads=args.threads)
        for isa in cpu_isa.expand(args.isa):
            for name in names:
                kwargs, flags = VARIANTS[name]
                r = bc.run_worker("experiments.bench_training:jax_worker",
                                  dict(problem=prob.to_json(), ckpt_dir=ckpt, steps=s["steps"],
                                       reps=args.reps, **kwargs),
                                  threads=args.threads, isa=isa, xla_flags=flags)
                tm, m = r["timing"], r["first_step_metrics"]
                rows.append({"isa": isa, "variant": name, "steady_s": tm["steady_s"],
                             "steady_all_s": tm["steady_all_s"], "cpu_util": tm["cpu_util"],
                             "compile_s": tm["compile_s"],
                             "peak_rss_steps_mib": r["peak_rss_steps_mib"],
                             **{f"first_{k}": v for k, v in m.items()},
                             "isa_used": r["_proc"]["isa"]})
                print(f"  {isa:6s} {name:34s} {tm['steady_s']:.2f} s/update, "
                      f"util {tm['cpu_util']:.2f}, grad norm {m['grad_norm']:.6g}", flush=True)
    isas = cpu_isa.expand(args.isa)
    md = [
        f"Our train step (`grpo.make_train_step`) on the training benchmark's {args.size} batch "
        f"(G={s['group']}, S={s['steps']}), {args.threads} threads, median of {args.reps} "
        "timed update(s) after the first, one process per row. Baseline = the benchmark's "
        f"setting (remat {bench_training.JAX_REMAT_POLICY}, timestep_chunk 1). "
        + cpu_isa.note(isas) + "\n",
        bc.md_table(["ISA", "variant", "steady s / update", "vs baseline", "CPU util",
                     "compile s", "peak RSS MiB (steps)", "loss", "grad norm", "mean ratio"],
                    [[r["isa"], r["variant"], r["steady_s"],
                      _vs_baseline(rows, r), r["cpu_util"], r["compile_s"],
                      r["peak_rss_steps_mib"], f"{r['first_loss']:.6g}",
                      f"{r['first_grad_norm']:.6g}", f"{r['first_ratio_mean']:.8f}"]
                     for r in rows]),
    ]
    bc.write_results("train_variants", args.out,
                     {"config": {**s, "variants": {n: VARIANTS[n] for n in names},
                                 "isas": list(isas), "reps": args.reps},
                      "threads": bc.thread_settings_doc(args.threads), "results": rows},
                     "\n".join(md), started=started, load_before=load0,
                     argv=sys.argv[1:] if argv is None else argv,
                     prog="python -m experiments.train_variants")
    return 0


def _vs_baseline(rows: list[dict[str, Any]], r: dict[str, Any]) -> str:
    """Speed-up of row ``r`` over the same ISA's baseline row ("-" without one)."""
    base = next((b for b in rows if b["isa"] == r["isa"] and b["variant"] == "baseline"), None)
    return f"x{base['steady_s'] / r['steady_s']:.2f}" if base else "-"


if __name__ == "__main__":
    raise SystemExit(main())
