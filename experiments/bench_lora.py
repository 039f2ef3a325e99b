"""LoRA vs full fine-tuning: one GRPO update's time and memory on CPU.

The same rollout and weights as the training benchmark (``bench_training``:
one group sampled by the PyTorch reference, the same trained timesteps), our
jitted ``grpo.make_train_step`` run twice in separate processes: updating every
transformer weight (AdamW moments for all of them), and updating rank-r
adapters on the reference's targets (``model.lora``: alpha 2r, the base frozen
as an input of the step). Reported: steady seconds per update, compile time,
trained parameters, optimizer-state bytes, XLA's memory analysis and peak RSS.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from experiments import bench_common as bc
from experiments.bench_training import SIZES, num_train_timesteps

# The adapters' share of the compute is r / hidden: the reference's r = 64 on
# FLUX.1-dev's 3072 is 1/48; on the medium model (hidden 256) r = 8 is 1/32
# (r = 64 there, 1/4, measured: results/lora_rank64.md).
RANKS = {"tiny": 4, "medium": 8}


def run(size: str, out_dir: str, threads: int, argv: list[str]) -> dict[str, Any]:
    started, load0 = time.time(), bc.loadavg()
    s = SIZES[size]
    prob = bc.PROBLEMS[s["problem"]]
    G, S, rank = s["group"], s["steps"], RANKS[size]
    k = num_train_timesteps(S)
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        ckpt = str(Path(tmp) / "transformer")
        bc.run_worker("experiments.bench_training:prepare_worker",
                      dict(problem=prob.to_json(), group=G, steps=S, ckpt_dir=ckpt, threads=threads),
                      threads=threads)
        raw = {name: bc.run_worker("experiments.bench_training:jax_worker",
                                   dict(problem=prob.to_json(), ckpt_dir=ckpt, steps=S, reps=s["reps_jax"],
                                        lora_rank=r), threads=threads)
               for name, r in (("full", 0), ("lora", rank))}
    rows = []
    for name, r in raw.items():
        tm, mem = r["timing"], r["memory_analysis"] or {}
        rows.append({
            "impl": "full fine-tuning" if name == "full" else f"LoRA rank {rank}, alpha {2 * rank}",
            "steady_s": tm["steady_s"], "samples_per_s": G / tm["steady_s"], "compile_s": tm["compile_s"],
            "cpu_util": tm["cpu_util"], "trained_params": r["trained_params"],
            "optimizer_state_mib": r["optimizer_state_mib"],
            "xla_temp_mib": mem.get("temp_bytes", 0) / 2**20,
            "xla_peak_estimate_mib": mem.get("peak_estimate_bytes", 0) / 2**20,
            "peak_rss_steps_mib": r["peak_rss_steps_mib"], "peak_rss_mib": r["_proc"]["peak_rss_mib"],
        })
    payload = {
        "config": {"size": size, **s, "train_timesteps": k, "lora_rank": rank, "lora_alpha": 2 * rank,
                   "model": prob.describe(), "dtype": "float32"},
        "threads": bc.thread_settings_doc(threads),
        "results": rows,
        "ratios": {"lora_speedup": rows[0]["steady_s"] / rows[1]["steady_s"],
                   "optimizer_state_fraction": rows[1]["optimizer_state_mib"] / rows[0]["optimizer_state_mib"]},
        "raw": raw,
    }
    md = [
        f"One GRPO update (G={G} samples x {k} trained timesteps of S={S}, AdamW) on model "
        f"`{prob.model}` ({prob.describe()['params']:,} params, {prob.num_img_tokens} image + "
        f"{prob.text_len} text tokens), fp32, {threads} threads, each variant in its own process. "
        "LoRA trains adapters on the reference's targets with the base frozen (an input of the step, "
        "no gradient, no optimizer state).\n",
        bc.md_table(["variant", "steady s / update", "samples/s", "compile s", "CPU util", "trained params",
                     "optimizer state MiB", "XLA temp MiB", "XLA peak estimate MiB",
                     "peak RSS MiB (steps)", "peak RSS MiB (process)"],
                    [[r["impl"], r["steady_s"], r["samples_per_s"], r["compile_s"], r["cpu_util"],
                      r["trained_params"], r["optimizer_state_mib"], r["xla_temp_mib"],
                      r["xla_peak_estimate_mib"], r["peak_rss_steps_mib"], r["peak_rss_mib"]] for r in rows]),
        "",
        f"Update time, full fine-tuning / LoRA: x{payload['ratios']['lora_speedup']:.2f}; LoRA's "
        f"optimizer state is {100 * payload['ratios']['optimizer_state_fraction']:.1f}% of full's.",
    ]
    bc.write_results("lora", out_dir, payload, "\n".join(md), started=started, load_before=load0, argv=argv)
    return payload
