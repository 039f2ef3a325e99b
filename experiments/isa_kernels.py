"""The train step's matmuls and a transpose, one at a time, per ISA and framework.

Usage::

    python -m experiments.isa_kernels [--isa both] [--out experiments/results]

The medium model's single-stream block at batch 8 (2304 = 8 x 288 token
rows, hidden 256, MLP 1024): its forward matmuls, the input-gradient
(``dY @ W^T``) and weight-gradient (``X^T @ dY``, contracting the 2304 rows)
matmuls of the backward pass, and the heads transpose of attention. Each runs
single-threaded in a worker per ISA; the time per call is CPU time (best of
``reps``), which a busy shared machine inflates far less than wall time
(a preempted process accrues none). Writes ``isa_kernels.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from experiments import bench_common as bc
from experiments import cpu_isa

PROG = "python -m experiments.isa_kernels"
ROWS, H, MLP = 2304, 256, 1024
# name -> (lhs shape, rhs shape, lhs contracting dim, rhs contracting dim)
MATMULS = {
    "fwd linear1 X@W [2304,256]x[256,1792]": ((ROWS, H), (H, 3 * H + MLP), 1, 0),
    "fwd linear2 X@W [2304,1280]x[1280,256]": ((ROWS, H + MLP), (H + MLP, H), 1, 0),
    "input-grad linear1 dY@W^T [2304,1792]x[256,1792]^T": ((ROWS, 3 * H + MLP), (H, 3 * H + MLP),
                                                           1, 1),
    "input-grad linear2 dY@W^T [2304,256]x[1280,256]^T": ((ROWS, H), (H + MLP, H), 1, 1),
    "weight-grad linear1 X^T@dY [2304,256]^Tx[2304,1792]": ((ROWS, H), (ROWS, 3 * H + MLP), 0, 0),
    "weight-grad linear2 X^T@dY [2304,1280]^Tx[2304,256]": ((ROWS, H + MLP), (ROWS, H), 0, 0),
}
TRANSPOSE = (8, 288, 4, 64)  # [B, L, heads, head_dim] -> [B, heads, L, head_dim]


def _cpu_best(fn, reps: int) -> float:
    """Least CPU seconds of one call over ``reps`` calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        c = time.process_time()
        fn()
        best = min(best, time.process_time() - c)
    return best


def worker(reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    torch = bc.torch_setup(1)
    rng = np.random.default_rng(0)
    rows = []
    for name, (ls, rs, lc, rc) in MATMULS.items():
        a, b = rng.standard_normal(ls, np.float32), rng.standard_normal(rs, np.float32)
        flops = 2.0 * ls[lc] * ls[1 - lc] * rs[1 - rc]
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        f = jax.jit(lambda x, y, lc=lc, rc=rc: jax.lax.dot_general(x, y, (((lc,), (rc,)), ((), ()))))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta_op = ta.t() if lc == 0 else ta  # torch.mm on the same (strided) operands
        tb_op = tb.t() if rc == 1 else tb
        j_s = _cpu_best(lambda: f(ja, jb).block_until_ready(), reps)
        t_s = _cpu_best(lambda: torch.mm(ta_op, tb_op), reps)
        rows.append({"op": name, "gflop": flops / 1e9, "jax_s": j_s, "torch_s": t_s,
                     "jax_gflops": flops / j_s / 1e9, "torch_gflops": flops / t_s / 1e9})
    x = rng.standard_normal(TRANSPOSE, np.float32)
    jx, tx = jnp.asarray(x), torch.from_numpy(x)
    tr = jax.jit(lambda v: jnp.transpose(v, (0, 2, 1, 3)))
    nbytes = 2 * x.nbytes  # read + write
    j_s = _cpu_best(lambda: tr(jx).block_until_ready(), reps)
    t_s = _cpu_best(lambda: tx.transpose(1, 2).contiguous(), reps)
    rows.append({"op": f"heads transpose {list(TRANSPOSE)} (0,2,1,3)", "gflop": None,
                 "jax_s": j_s, "torch_s": t_s, "jax_gbps": nbytes / j_s / 1e9,
                 "torch_gbps": nbytes / t_s / 1e9})
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=cpu_isa.ISA_CHOICES, default="both")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args(argv)
    started, load0 = time.time(), bc.loadavg()
    isas = cpu_isa.expand(args.isa)
    by_isa = {isa: bc.run_worker("experiments.isa_kernels:worker", {"reps": args.reps},
                                 threads=1, isa=isa) for isa in isas}

    def rate(r: dict[str, Any], fw: str) -> str:
        if r["gflop"] is None:
            return f"{r[f'{fw}_gbps']:.1f} GB/s"
        return f"{r[f'{fw}_gflops']:.1f} GFLOP/s"
    ops = [r["op"] for r in by_isa[isas[0]]["rows"]]
    md = [
        "Single-threaded, CPU time per call (best of "
        f"{args.reps}); the medium model's single-stream block at batch 8. "
        + cpu_isa.note(isas) + "\n",
        bc.md_table(["op", *(f"{fw} {isa}" for isa in isas for fw in ("jax", "torch"))],
                    [[op, *(rate(next(r for r in by_isa[isa]["rows"] if r["op"] == op), fw)
                            for isa in isas for fw in ("jax", "torch"))] for op in ops]),
    ]
    bc.write_results("isa_kernels", args.out, {"config": {"isas": list(isas), "reps": args.reps},
                                               "by_isa": by_isa},
                     "\n".join(md), started=started, load_before=load0, argv=argv, prog=PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
