"""Benchmarks of prefgrpo_jax against the PyTorch reference stack, on CPU.

Usage::

    python -m experiments.benchmark <sampling|training|pairs|mfu|memory|scaling|lora|all>
        [--size tiny|medium] [--out experiments/results] [--threads N]
    python -m experiments.benchmark profile [--size ...]

Each benchmark writes ``<out>/<name>.json`` (all numbers, machine, versions,
thread settings, load average, the command) and ``<out>/<name>.md`` (tables).
Every framework measurement runs in its own subprocess (see ``bench_common``).

* sampling: one group through S SDE steps; ours (jit + scan) vs diffusers in a
  torch loop, batch=G and batch=1 (the reference's form).
* training: one GRPO update; ours (``grpo.make_train_step``) vs torch autograd
  with a backward per (sample, timestep) and AdamW, batch=1 (reference) and
  batch=B per timestep; peak RSS per framework.
* pairs: all G(G-1)/2 pairs of a group with the pairwise reward model,
  vectorised (backbone once per image) vs naive (backbone per pair).
* mfu: FLOPs per training / sampling step (jaxpr count, XLA cost analysis,
  analytic) over step time, vs this machine's measured matmul peak.
* memory: compiled memory analysis and measured peak RSS of a train step with
  and without remat at two model sizes; largest group that fits a budget.
* scaling: sampling on 1, 2, 4, 8 simulated CPU devices (weak scaling).
* lora: one GRPO update with LoRA adapters vs full fine-tuning (ours, time,
  optimizer state, memory).

``profile`` (not part of ``all``) is a diagnostic behind those numbers: per-op
time of one FLUX forward and forward+backward in both frameworks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

BENCHMARKS = ("sampling", "training", "pairs", "mfu", "memory", "scaling", "lora")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=(*BENCHMARKS, "all", "profile"),
                        help="one benchmark, all seven, or 'profile' (a diagnostic: per-op "
                             "time of a forward / forward+backward, JAX vs PyTorch)")
    parser.add_argument("--size", choices=("tiny", "medium"), default="medium",
                        help="problem size (tiny: smoke test, seconds; medium: the default)")
    parser.add_argument("--out", default="experiments/results", help="results directory")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for each framework (default: all CPUs)")
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    failed = []
    for name in names:
        print(f"[benchmark] {name} --size {args.size}", flush=True)
        t = time.time()
        module = importlib.import_module(f"experiments.bench_{name}")
        try:
            module.run(args.size, args.out, args.threads, argv)
        except Exception as e:  # noqa: BLE001 -- report, continue with the others
            if args.benchmark != "all":
                raise
            print(f"[benchmark] {name} FAILED: {e}", flush=True)
            failed.append(name)
            continue
        print(f"[benchmark] {name} done in {time.time() - t:.1f} s -> "
              f"{args.out}/{name}.json", flush=True)
    if failed:
        print(f"[benchmark] failed: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
