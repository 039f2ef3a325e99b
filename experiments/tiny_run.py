"""Wall time of the README's main command (``configs/tiny.py``) per ISA.

Usage::

    python -m experiments.tiny_run [--isa both] [--out experiments/results]

For each ISA: ``python -m prefgrpo_jax.main --config=configs/tiny.py
--workdir=<fresh dir>`` in a fresh process restricted to that ISA
(``experiments/cpu_isa.py``; all CPUs, default threads, as a user runs it),
timed from start to exit. Writes ``tiny_run.{json,md}``: wall and CPU time,
the run's closing trend line (the verifier score over the run) and the
held-out eval scores, so a cheaper config can be checked for what the run
still shows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import bench_common as bc
from experiments import cpu_isa

PROG = "python -m experiments.tiny_run"


def run_tiny(isa: str, workdir: str, extra: list[str]) -> dict:
    """One run of the main command under ``isa``; wall / CPU seconds and its output."""
    isa_vars, flags = cpu_isa.env(isa)
    env = {k: v for k, v in os.environ.items() if k not in cpu_isa.WORKER_VARS}
    env.update(isa_vars, JAX_PLATFORMS="cpu", PYTHONPATH=str(bc.REPO),
               XLA_FLAGS=" ".join([*flags, os.environ.get("XLA_FLAGS", "")]).strip())
    cmd = [sys.executable, "-m", "experiments.cpu_isa", "prefgrpo_jax.main",
           "--config=configs/tiny.py", f"--workdir={workdir}", *extra]
    print(f"  [tiny_run] isa={isa}: {' '.join(cmd[2:])}", flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=bc.REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny run (isa={isa}) failed (rc={proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    lines = proc.stdout.splitlines()
    metrics = [json.loads(line) for line in
               (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [{k: v for k, v in m.items() if k == "step" or k.startswith("eval/")}
             for m in metrics if any(k.startswith("eval/") for k in m)]
    return {"isa": isa, "wall_s": wall,
            "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "trend": next((line for line in reversed(lines) if line.startswith("reward_mean:")),
                          None),
            "evals": evals, "steps": max((m.get("step", 0) for m in metrics), default=0),
            "xla_flags": env["XLA_FLAGS"], "stdout_tail": lines[-15:]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=cpu_isa.ISA_CHOICES, default="both")
    parser.add_argument("--out", default="experiments/results")
    args, extra = parser.parse_known_args(argv)  # the rest goes to prefgrpo_jax.main
    started, load0 = time.time(), bc.loadavg()
    isas = cpu_isa.expand(args.isa)
    runs = []
    for isa in isas:
        with tempfile.TemporaryDirectory(prefix=f"tiny_{isa}_") as workdir:
            runs.append(run_tiny(isa, workdir, extra))
        print(f"  [tiny_run] isa={isa}: {runs[-1]['wall_s']:.0f} s; {runs[-1]['trend']}",
              flush=True)
    md = [
        "The README's main command, `python -m prefgrpo_jax.main --config=configs/tiny.py "
        f"--workdir=...`{' ' + ' '.join(extra) if extra else ''}, start to exit (imports, "
        "compilation, training, evals, checkpoints), all CPUs. " + cpu_isa.note(isas) + "\n",
        bc.md_table(["ISA", "wall s", "wall min", "CPU s", "steps", "end-of-run trend"],
                    [[r["isa"], r["wall_s"], r["wall_s"] / 60, r["cpu_s"], r["steps"],
                      r["trend"] or "-"] for r in runs]),
        "",
        "Held-out eval (verifier) per run:\n",
        *[f"* {r['isa']}: " + "; ".join(
            ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in e.items()) for e in r["evals"]) for r in runs],
    ]
    bc.write_results("tiny_run", args.out, {"config": {"isas": list(isas), "extra_args": extra},
                                            "runs": runs},
                     "\n".join(md), started=started, load_before=load0, argv=argv, prog=PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
