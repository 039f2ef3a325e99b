"""Benchmarks of prefgrpo_jax against the PyTorch reference stack, on CPU.

Usage::

    python -m experiments.benchmark <sampling|training|pairs|mfu|memory|scaling|overlap|lora|all>
        [--size tiny|medium] [--out experiments/results] [--threads N]
        [--isa native|avx2|both] [--xla_flags "..."]
    python -m experiments.benchmark profile [--size ...] [--isa ...]

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
* overlap: one training step with a fake judge of realistic latency, the judge
  overlapped with decoding and training (``train.overlap``) vs sequential.
* lora: one GRPO update with LoRA adapters vs full fine-tuning (ours, time,
  optimizer state, memory).

``--isa``: the instruction set the workers may use (``experiments/cpu_isa.py``):
``native`` (the CPU's own), ``avx2`` (an AVX-512 machine restricted to
AVX2 in XLA, YNNPACK, ATen, MKL and oneDNN) or ``both`` (each ISA in its own
workers, one results file with an ISA column; sampling, training and profile).

``profile`` (not part of ``all``) is a diagnostic behind those numbers: per-op
time of one FLUX forward and forward+backward in both frameworks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

from experiments import bench_common, cpu_isa

BENCHMARKS = ("sampling", "training", "pairs", "mfu", "memory", "scaling", "overlap", "lora")
# Benchmarks whose run() measures several ISAs into one results file.
MULTI_ISA = ("sampling", "training", "profile")


@contextlib.contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` inside, restored after: workers started inside
    (``bench_common.run_worker``) read ``BENCH_ISA`` and ``BENCH_XLA_FLAGS``."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


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
    parser.add_argument("--isa", choices=cpu_isa.ISA_CHOICES, default=bench_common.default_isa(),
                        help="instruction set of the workers (default: $BENCH_ISA or native): native, avx2 (XLA, YNNPACK, ATen, "
                             "MKL, oneDNN restricted to AVX2), or both (sampling, training, "
                             "profile: each ISA measured, one table with an ISA column)")
    parser.add_argument("--xla_flags", default=os.environ.get("BENCH_XLA_FLAGS", ""),
                        help="more XLA flags for every JAX worker (space-separated; recorded in the "
                             "results), e.g. --xla_flags=--xla_cpu_experimental_ynn_fusion_type=")
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    isas = cpu_isa.expand(args.isa)
    single = [n for n in names if n not in MULTI_ISA]
    if len(isas) > 1 and single:
        parser.error(f"--isa both is supported by {', '.join(MULTI_ISA)}; run {', '.join(single)} "
                     "once per ISA (--isa native, then --isa avx2, with different --out)")
    failed = []
    for name in names:
        print(f"[benchmark] {name} --size {args.size}", flush=True)
        t = time.time()
        module = importlib.import_module(f"experiments.bench_{name}")
        try:
            with _environ("BENCH_XLA_FLAGS", args.xla_flags):
                if name in MULTI_ISA:
                    module.run(args.size, args.out, args.threads, argv, isas=isas)
                else:
                    with _environ("BENCH_ISA", isas[0]):
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
