"""Where the time goes: one FLUX forward and forward+backward, JAX vs PyTorch.

Not one of the six benchmarks (``all`` skips it): a diagnostic behind their
numbers. At the medium size, batch B (the GRPO micro-batch), it times

* JAX: jitted forward, jitted ``value_and_grad`` of a scalar of the velocity;
* PyTorch: forward under ``no_grad``, forward + ``backward()``;

then profiles the JAX forward+backward with ``jax.profiler`` (a perfetto trace
of the XLA CPU thunks, aggregated per HLO op and per op kind, each op joined to
its HLO line) and the PyTorch forward with ``torch.profiler`` (per aten op).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any

from experiments import bench_common as bc
from experiments import cpu_isa

SIZES = {
    "tiny": dict(problem="tiny", batch=2, reps=2, top=10),
    "medium": dict(problem="medium", batch=8, reps=3, top=16),
}


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _cpu_util(fn, reps: int) -> float:
    """Process CPU time / wall time over ``reps`` calls (cores kept busy, of ``threads``)."""
    c, t = time.process_time(), time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.process_time() - c) / (time.perf_counter() - t)


def worker(problem: dict, batch: int, reps: int, top: int, threads: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from prefgrpo_jax.models.flux import REMAT_POLICIES
    prob = bc.Problem.from_json(problem)
    m = prob.model_kwargs()
    L, C = prob.num_img_tokens, m["in_channels"]
    fwd_flops = bc.forward_flops(m, batch, L, prob.text_len)["total"]
    cond_np = bc.make_cond_np(prob, batch)

    # --- JAX.
    graphdef, params = bc.jax_init_flux(prob)
    vf = bc.jax_velocity_fn(graphdef)
    cond = bc.jax_cond(cond_np)
    x = jax.random.normal(jax.random.key(0), (batch, L, C))
    t = jnp.full((batch,), 0.5)
    fwd = jax.jit(vf)
    grad = jax.jit(jax.value_and_grad(lambda p: jnp.mean(vf(p, x, t, cond) ** 2)))
    j_fwd = _best(lambda: fwd(params, x, t, cond).block_until_ready(), reps)
    j_fb = _best(lambda: jax.block_until_ready(grad(params)), reps)
    j_fb_util = _cpu_util(lambda: jax.block_until_ready(grad(params)), reps)
    # What the profile below points at (scan residual traffic): the same
    # forward+backward with each rematerialisation policy.
    remat_variants = [{"remat": "off", "fwd_bwd_s": j_fb}]
    for policy in REMAT_POLICIES:
        gd, _ = bc.jax_init_flux(prob, remat=True, remat_policy=policy)
        vf_r = bc.jax_velocity_fn(gd)
        grad_r = jax.jit(jax.value_and_grad(lambda p, vf_r=vf_r: jnp.mean(vf_r(p, x, t, cond) ** 2)))
        remat_variants.append({"remat": policy,
                               "fwd_bwd_s": _best(lambda: jax.block_until_ready(grad_r(params)), reps)})

    with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(reps):
            jax.block_until_ready(grad(params))
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))
        events = json.load(gzip.open(files[-1]))["traceEvents"] if files else []
    # HLO instructions by name; the trace also holds host-side events (dispatch,
    # argument handling) and container ops (while / call) that include their
    # bodies: only leaf HLO ops are counted.
    hlo: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for line in grad.lower(params).compile().as_text().splitlines():
        mt = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(",
                      line)
        if mt:
            name = mt.group(1)
            shapes[name] = [int(d) for d in mt.group(3).split(",") if d]
            hlo[name] = re.sub(r", metadata=.*", "", line.strip())[:220]
            if mt.group(4) in ("while", "call", "conditional"):
                hlo[name] = ""  # container: skip
    per_op: collections.Counter = collections.Counter()
    runs: collections.Counter = collections.Counter()  # executions per call (scan bodies)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and hlo.get(name):
            per_op[name] += e.get("dur", 0) / 1e6 / reps  # seconds per call
            runs[name] += 1 / reps
    kinds: collections.Counter = collections.Counter()
    for name, sec in per_op.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += sec

    def dot_gflop(name: str) -> float | None:
        """GFLOP of a plain HLO ``dot`` (2 x output size x contracted size)."""
        line = hlo[name]
        md = re.search(r" dot\(%?([\w.\-]+), .*lhs_contracting_dims=\{([\d,]*)\}", line)
        if not md or md.group(1) not in shapes:
            return None
        lhs = shapes[md.group(1)]
        k = 1
        for d in md.group(2).split(","):
            k *= lhs[int(d)] if d else 1
        out = 1
        for d in shapes[name]:
            out *= d
        return 2.0 * out * k / 1e9
    jax_top = []
    for n, sec in per_op.most_common(top):
        gf = dot_gflop(n)
        jax_top.append({"op": n, "s_per_call": sec, "runs_per_call": runs[n], "hlo": hlo[n],
                        "gflops": gf * runs[n] / sec if gf else None})

    # --- PyTorch.
    torch = bc.torch_setup(threads)
    model = bc.torch_build_flux(prob).train()
    ct = {k: torch.from_numpy(v) for k, v in cond_np.items()}
    xt, tt = torch.from_numpy(jax.device_get(x)), torch.full((batch,), 0.5)

    def t_fwd():
        with torch.no_grad():
            bc.torch_velocity(model, xt, tt, ct)

    def t_fb():
        (bc.torch_velocity(model, xt, tt, ct) ** 2).mean().backward()
    p_fwd, p_fb = _best(t_fwd, reps), _best(t_fb, reps)
    p_fb_util = _cpu_util(t_fb, reps)

    # Plain GEMM throughput of each framework's CPU kernels (same square fp32 matmul).
    n = 2048 if prob.model != "tiny" else 512
    a_j = jax.random.normal(jax.random.key(1), (n, n))
    mm = jax.jit(jnp.dot)
    a_t = torch.randn(n, n)
    gemm = {"n": n,
            "jax_gflops": 2 * n**3 / _best(lambda: mm(a_j, a_j).block_until_ready(), 5) / 1e9,
            "torch_gflops": 2 * n**3 / _best(lambda: torch.mm(a_t, a_t), 5) / 1e9}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t_fwd()
    torch_top = sorted(({"op": e.key, "s_per_call": e.self_cpu_time_total / 1e6,
                         "calls": e.count} for e in prof.key_averages()),
                       key=lambda r: -r["s_per_call"])[:top]
    return {
        "forward_gflop": fwd_flops / 1e9, "gemm_fp32": gemm,
        "jax": {"fwd_s": j_fwd, "fwd_bwd_s": j_fb, "fwd_bwd_over_fwd": j_fb / j_fwd,
                "fwd_gflops": fwd_flops / j_fwd / 1e9, "fwd_bwd_gflops": 3 * fwd_flops / j_fb / 1e9,
                "fwd_bwd_cpu_util": j_fb_util,
                "profiled_s_per_call": sum(per_op.values()), "remat_variants": remat_variants,
                "by_kind": dict(kinds.most_common(12)), "top_ops": jax_top},
        "torch": {"fwd_s": p_fwd, "fwd_bwd_s": p_fb, "fwd_bwd_over_fwd": p_fb / p_fwd,
                  "fwd_gflops": fwd_flops / p_fwd / 1e9,
                  "fwd_bwd_gflops": 3 * fwd_flops / p_fb / 1e9, "fwd_bwd_cpu_util": p_fb_util,
                  "forward_top_ops": torch_top},
    }


def _isa_section(r: dict[str, Any], s: dict[str, Any], threads: int) -> list[str]:
    """The markdown of one ISA's profile."""
    j, t = r["jax"], r["torch"]
    return [
        f"One FLUX forward and forward+backward (gradient of mean(v^2) w.r.t. all params), "
        f"model `{s['problem']}`, batch {s['batch']}, {r['forward_gflop']:.2f} GFLOP per "
        f"forward, fp32, {threads} threads; best of {s['reps']}.\n",
        bc.md_table(["framework", "fwd s", "fwd+bwd s", "(fwd+bwd)/fwd", "fwd GFLOP/s",
                     "fwd+bwd GFLOP/s (3x fwd FLOPs)"],
                    [["jax (jit)", j["fwd_s"], j["fwd_bwd_s"], j["fwd_bwd_over_fwd"],
                      j["fwd_gflops"], j["fwd_bwd_gflops"]],
                     ["torch (eager)", t["fwd_s"], t["fwd_bwd_s"], t["fwd_bwd_over_fwd"],
                      t["fwd_gflops"], t["fwd_bwd_gflops"]]]),
        "",
        "JAX forward+backward by rematerialisation policy (`model.remat_policy`; the op "
        "profile below is of `off`):\n",
        bc.md_table(["remat", "fwd+bwd s", "(fwd+bwd)/fwd", "vs torch fwd+bwd"],
                    [[v["remat"], v["fwd_bwd_s"], v["fwd_bwd_s"] / j["fwd_s"],
                      f"x{t['fwd_bwd_s'] / v['fwd_bwd_s']:.2f}"] for v in j["remat_variants"]]),
        "",
        f"Square fp32 GEMM {r['gemm_fp32']['n']}^2 (best of 5): jnp.dot "
        f"{r['gemm_fp32']['jax_gflops']:.1f} GFLOP/s, torch.mm "
        f"{r['gemm_fp32']['torch_gflops']:.1f} GFLOP/s.",
        "",
        f"JAX forward+backward by XLA op kind (s per call; profiled total "
        f"{j['profiled_s_per_call']:.3f} s):\n",
        bc.md_table(["op kind", "s / call", "share"],
                    [[k, v, f"{100 * v / j['profiled_s_per_call']:.1f}%"]
                     for k, v in j["by_kind"].items()]),
        "",
        "Top JAX ops (forward+backward):\n",
        bc.md_table(["op", "s / call", "runs / call", "GFLOP/s (plain dots)", "HLO"],
                    [[o["op"], o["s_per_call"], round(o["runs_per_call"]), o["gflops"],
                      "`" + o["hlo"].replace("|", "/") + "`"] for o in j["top_ops"]]),
        "",
        "Top PyTorch ops (forward, self CPU time):\n",
        bc.md_table(["aten op", "s", "calls"],
                    [[o["op"], o["s_per_call"], o["calls"]] for o in t["forward_top_ops"]]),
    ]


def _side_by_side(by_isa: dict[str, dict[str, Any]]) -> list[str]:
    """Headline numbers and JAX op kinds, one column per ISA."""
    isas = list(by_isa)
    head = [("jax fwd s", lambda r: r["jax"]["fwd_s"]),
            ("jax fwd+bwd s", lambda r: r["jax"]["fwd_bwd_s"]),
            ("torch fwd s", lambda r: r["torch"]["fwd_s"]),
            ("torch fwd+bwd s", lambda r: r["torch"]["fwd_bwd_s"]),
            ("jnp.dot GFLOP/s", lambda r: r["gemm_fp32"]["jax_gflops"]),
            ("torch.mm GFLOP/s", lambda r: r["gemm_fp32"]["torch_gflops"]),
            ("jax CPU util (fwd+bwd)", lambda r: r["jax"]["fwd_bwd_cpu_util"]),
            ("torch CPU util (fwd+bwd)", lambda r: r["torch"]["fwd_bwd_cpu_util"])]
    kinds = sorted({k for r in by_isa.values() for k in r["jax"]["by_kind"]},
                   key=lambda k: -max(r["jax"]["by_kind"].get(k, 0) for r in by_isa.values()))
    return [
        "## Side by side\n",
        bc.md_table(["measure", *isas], [[name, *(f(by_isa[i]) for i in isas)]
                                         for name, f in head]),
        "",
        "JAX forward+backward, s per call by XLA op kind (remat off):\n",
        bc.md_table(["op kind", *isas],
                    [[k, *(by_isa[i]["jax"]["by_kind"].get(k) for i in isas)] for k in kinds]),
        "",
    ]


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None,
        isas: tuple[str, ...] | None = None) -> dict[str, Any]:
    started, load0, s, prob, isas = bc.run_setup(SIZES, size, overrides, isas)
    by_isa = {isa: bc.run_worker("experiments.bench_profile:worker",
                                 dict(problem=prob.to_json(), batch=s["batch"], reps=s["reps"],
                                      top=s["top"], threads=threads), threads=threads, isa=isa)
              for isa in isas}
    payload = {"config": {"size": size, **s, "model": prob.describe(), "dtype": "float32",
                          "isas": list(isas)},
               "threads": bc.thread_settings_doc(threads), "by_isa": by_isa}
    md = [cpu_isa.note(isas), ""]
    if len(isas) > 1:
        md += _side_by_side(by_isa)
    for isa, r in by_isa.items():
        md += [f"## ISA {isa}\n", *_isa_section(r, s, threads), ""]
    bc.write_results("profile", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload
