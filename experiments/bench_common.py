"""Shared machinery of the benchmarks (``python -m experiments.benchmark ...``).

Every measurement runs in its own worker subprocess
(``python -m experiments.bench_common <module:function> in.json out.json``) so
that

* the thread / device settings (``XLA_FLAGS``, CPU affinity, torch threads) are
  fixed before JAX or PyTorch is imported,
* the peak RSS (``ru_maxrss``) of one framework is not polluted by the other,
* simulated device counts (``--xla_force_host_platform_device_count``) can
  differ per run.

This module must not import JAX or PyTorch at top level: the parent process
only orchestrates.

Threads: a worker is pinned to the first ``threads`` CPUs with
``os.sched_setaffinity`` (both XLA's and PyTorch's thread pools size themselves
from the affinity mask), PyTorch gets ``torch.set_num_threads(threads)`` and
``set_num_interop_threads(1)``, and with ``threads == 1`` XLA additionally gets
``--xla_cpu_multi_thread_eigen=false``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import cpu_isa

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "results"

# ---------------------------------------------------------------------------
# Problem sizes.

# FluxConfig keyword arguments (JSON-able; both frameworks build from these).
MODELS: dict[str, dict[str, Any]] = {
    # Smoke-test size: a fraction of a megabyte.
    "tiny": dict(in_channels=64, out_channels=64, hidden_size=64, num_heads=2, depth=1,
                 depth_single=1, axes_dim=[8, 12, 12], context_dim=32, vec_dim=16,
                 guidance_embed=True),
    # "Medium" CPU config: FLUX.1 block structure at hidden 256, 2 + 4 blocks (9.3M params).
    "medium": dict(in_channels=64, out_channels=64, hidden_size=256, num_heads=4, depth=2,
                   depth_single=4, axes_dim=[8, 28, 28], context_dim=256, vec_dim=128,
                   guidance_embed=True),
    # Second size of the memory benchmark at --size medium (71M params).
    "large": dict(in_channels=64, out_channels=64, hidden_size=512, num_heads=8, depth=4,
                  depth_single=8, axes_dim=[8, 28, 28], context_dim=512, vec_dim=256,
                  guidance_embed=True),
    # FLUX.1-dev itself (11.9B): only compiled, never run, in the memory benchmark.
    "flux_dev": dict(in_channels=64, out_channels=64, hidden_size=3072, num_heads=24,
                     depth=19, depth_single=38, axes_dim=[16, 56, 56], context_dim=4096,
                     vec_dim=768, guidance_embed=True),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """Model + input shapes of one benchmark run.

    ``grid`` is the packed-token grid (a ``2 grid`` x ``2 grid`` latent with 16
    channels packed 2x2 into 64); ``text_len`` the T5 tokens.
    """

    model: str
    grid: tuple[int, int]
    text_len: int

    @property
    def num_img_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def model_kwargs(self) -> dict[str, Any]:
        return dict(MODELS[self.model])

    def describe(self) -> dict[str, Any]:
        m = self.model_kwargs()
        return {
            "model": self.model, **m,
            "params": count_params(m),
            "latent_hw": [2 * self.grid[0], 2 * self.grid[1]],
            "image_tokens": self.num_img_tokens, "text_tokens": self.text_len,
        }

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "grid": list(self.grid), "text_len": self.text_len}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Problem:
        return cls(model=d["model"], grid=tuple(d["grid"]), text_len=d["text_len"])


PROBLEMS = {
    "tiny": Problem("tiny", (4, 4), 8),
    "medium": Problem("medium", (16, 16), 32),  # 32x32 latents -> 256 image tokens
}


def count_params(m: dict[str, Any]) -> int:
    """Parameter count of a FLUX transformer (matches ``nnx.state`` sizes)."""
    h, mlp = m["hidden_size"], 4 * m["hidden_size"]
    hd = h // m["num_heads"]
    lin = lambda i, o: i * o + o  # noqa: E731
    n = lin(m["in_channels"], h) + lin(m["context_dim"], h)
    n += lin(256, h) + lin(h, h) + lin(m["vec_dim"], h) + lin(h, h)
    if m["guidance_embed"]:
        n += lin(256, h) + lin(h, h)
    double = 2 * (lin(h, 6 * h) + lin(h, 3 * h) + 2 * hd + lin(h, h) + lin(h, mlp) + lin(mlp, h))
    single = lin(h, 3 * h + mlp) + lin(h + mlp, h) + 2 * hd + lin(h, 3 * h)
    n += m["depth"] * double + m["depth_single"] * single
    n += lin(h, 2 * h) + lin(h, m["out_channels"])
    return n


def forward_flops(m: dict[str, Any], batch: int, n_img: int, n_txt: int) -> dict[str, float]:
    """Analytic FLOPs (2 x multiply-adds) of one FLUX forward pass.

    Counts every matmul (projections, MLPs, modulation, embedders) and the two
    attention matmuls (QK^T and PV); elementwise work (norms, RoPE, softmax,
    activations) is ignored (< 2% at these sizes).
    """
    h, mlp, d, ds = m["hidden_size"], 4 * m["hidden_size"], m["depth"], m["depth_single"]
    n = n_img + n_txt
    per_sample = (2 if m["guidance_embed"] else 1) * (256 * h + h * h) + (m["vec_dim"] * h + h * h)
    per_sample += d * 2 * (h * 6 * h) + ds * (h * 3 * h) + h * 2 * h
    tokens = n_img * m["in_channels"] * h + n_txt * m["context_dim"] * h
    tokens += d * n * (h * 3 * h + h * h + 2 * h * mlp)  # both streams together
    tokens += ds * n * (h * (3 * h + mlp) + (h + mlp) * h)
    tokens += n_img * h * m["out_channels"]
    attention = (d + ds) * 2 * n * n * h  # QK^T and PV, all heads
    matmul = 2.0 * batch * (per_sample + tokens)
    attn = 2.0 * batch * attention
    return {"matmul": matmul, "attention": attn, "total": matmul + attn}


# ---------------------------------------------------------------------------
# Machine / environment description.


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "dirty_files": len([l for l in git("status", "--porcelain").splitlines() if l])}


def machine_info() -> dict[str, Any]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                      if line.startswith("model name")), platform.processor())
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal")), 0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_simd": cpu_isa.cpu_flags(),
        "ram_gib": round(mem_kib / 2**20, 2),
        "platform": platform.platform(),
        "versions": _versions(),
        "git": _git(),
    }


def loadavg() -> list[float]:
    try:
        return [float(x) for x in _read("/proc/loadavg").split()[:3]]
    except ValueError:
        return []


def worker_env(threads: int, device_count: int | None = None,
               isa: str = "native", xla_flags: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment of a worker: thread and ISA settings fixed before any import.

    ``xla_flags``: more XLA flags (experiments with XLA's CPU settings).
    """
    isa_vars, flags = cpu_isa.env(isa)
    flags = [*flags, *xla_flags]
    if device_count is not None:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    if threads == 1:
        # (The often-quoted "intra_op_parallelism_threads=1" is no XLA flag: a bare
        # word in XLA_FLAGS silently ends flag parsing, dropping the flags after it.
        # The affinity mask is what bounds XLA's thread pool.)
        flags.append("--xla_cpu_multi_thread_eigen=false")
    env = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "BENCH_THREADS": str(threads),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **isa_vars,
    }
    return env


def thread_settings_doc(threads: int) -> dict[str, Any]:
    return {
        "threads": threads,
        "cpu_affinity": f"os.sched_setaffinity(0, first {threads} CPUs) in every worker",
        "torch": f"torch.set_num_threads({threads}); torch.set_num_interop_threads(1)",
        "xla": ("default CPU thread pool (sized from the affinity mask), "
                "--xla_cpu_multi_thread_eigen default (true)") if threads > 1 else
               "--xla_cpu_multi_thread_eigen=false (thread pool bounded by the affinity mask)",
        "env": worker_env(threads),
    }


# ---------------------------------------------------------------------------
# Worker subprocesses.


class WorkerError(RuntimeError):
    pass


def default_isa() -> str:
    """The ISA of workers started without an explicit one (``--isa`` sets it)."""
    return os.environ.get("BENCH_ISA", "native")


def run_setup(sizes: dict[str, dict[str, Any]], size: str,
              overrides: dict[str, Any] | None, isas: tuple[str, ...] | None):
    """Start of a benchmark's ``run``: (start time, load average, settings, problem, ISAs)."""
    started, load = time.time(), loadavg()
    s = {**sizes[size], **(overrides or {})}
    return started, load, s, PROBLEMS[s["problem"]], tuple(isas or (default_isa(),))


def extra_xla_flags() -> tuple[str, ...]:
    """XLA flags every JAX worker gets on top of its own (``benchmark --xla_flags``)."""
    return tuple(os.environ.get("BENCH_XLA_FLAGS", "").split())


def run_worker(target: str, args: dict[str, Any], *, threads: int,
               device_count: int | None = None, timeout: float = 1800,
               isa: str | None = None, xla_flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs ``target`` ("module:function") with ``**args`` in a fresh interpreter.

    ``isa`` (default ``default_isa()``): see ``cpu_isa``. Returns the
    function's dict plus ``_proc`` (peak RSS, wall and CPU time, the ISA
    settings the worker ran with).
    """
    isa = isa or default_isa()
    env = {k: v for k, v in os.environ.items() if k not in cpu_isa.WORKER_VARS}
    env.update(worker_env(threads, device_count, isa, (*extra_xla_flags(), *xla_flags)))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        fin, fout = Path(tmp) / "in.json", Path(tmp) / "out.json"
        fin.write_text(json.dumps(args))
        cmd = [sys.executable, "-m", "experiments.bench_common", target, str(fin), str(fout)]
        print(f"  [worker] {target} threads={threads} isa={isa}"
              + (f" devices={device_count}" if device_count else ""), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, capture_output=True,
                              text=True)
        if proc.returncode != 0 or not fout.exists():
            tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
            raise WorkerError(f"worker {target} failed (rc={proc.returncode}):\n{tail}")
        return json.loads(fout.read_text())


def _rss_now_mib() -> float:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


_PEAK_BEFORE_RESET = 0.0


def peak_rss_mib() -> float:
    """Peak RSS since the start of the process or the last ``reset_peak_rss``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def process_peak_rss_mib() -> float:
    """Peak RSS over the whole process, across ``reset_peak_rss`` calls."""
    return max(_PEAK_BEFORE_RESET, peak_rss_mib())


def reset_peak_rss() -> float:
    """Resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` = 5).

    Lets a worker measure the peak of one phase (e.g. the train steps) apart
    from an earlier one (imports, weight loading, XLA compilation); freed heap
    is returned to the OS (``malloc_trim``) first. Returns the peak before the
    reset; ``rss_now_mib()`` right after is the phase's starting point.
    """
    global _PEAK_BEFORE_RESET
    before = peak_rss_mib()
    _PEAK_BEFORE_RESET = max(_PEAK_BEFORE_RESET, before)
    try:  # hand freed heap (e.g. XLA's compiler scratch) back to the OS first
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def rss_now_mib() -> float:
    return _rss_now_mib()


def _worker_main(target: str, fin: str, fout: str) -> None:
    isa_record = cpu_isa.apply_in_worker()
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:threads])
    t0, c0 = time.perf_counter(), time.process_time()
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**json.loads(Path(fin).read_text()))
    result["_proc"] = {
        "peak_rss_mib": round(process_peak_rss_mib(), 1),
        "wall_s": round(time.perf_counter() - t0, 3),
        "cpu_s": round(time.process_time() - c0, 3),
        "affinity": sorted(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "isa": cpu_isa.describe_worker(isa_record),
    }
    Path(fout).write_text(json.dumps(result, default=_json_default))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


# ---------------------------------------------------------------------------
# Timing.


def timed(fn: Callable[[], Any], *, reps: int, min_time: float = 0.0,
          max_reps: int | None = None) -> dict[str, Any]:
    """First call (compile / warm-up) separately, then ``reps`` steady-state calls.

    ``fn`` must block until its result is ready. Runs more reps (up to
    ``max_reps``) while their total is below ``min_time`` seconds.
    ``cpu_util`` = process CPU time / wall time over the steady calls (>1 means
    more than one core was busy; <1 means waiting, e.g. for other processes).
    """
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times: list[float] = []
    c0 = time.process_time()
    max_reps = max(reps, max_reps or reps)
    while len(times) < reps or (sum(times) < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - c0
    return {
        "first_call_s": first,
        "steady_s": statistics.median(times),
        "steady_min_s": min(times),
        "steady_all_s": times,
        "reps": len(times),
        "cpu_util": cpu / sum(times),
    }


# ---------------------------------------------------------------------------
# Inputs shared by both frameworks (numpy only).


def make_cond_np(problem: Problem, batch: int, seed: int = 0, guidance: float = 3.5):
    """One prompt's conditioning repeated ``batch`` times (a group shares its prompt).

    Returns numpy arrays: img_ids [L,3], txt_ids [T,3] (2-D, diffusers style) and
    txt [B,T,D], y [B,D_pool], guidance [B].
    """
    import numpy as np
    m = problem.model_kwargs()
    rng = np.random.default_rng(seed)
    gh, gw = problem.grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    img_ids = np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(np.float32)
    txt_ids = np.zeros((problem.text_len, 3), np.float32)
    txt = rng.standard_normal((1, problem.text_len, m["context_dim"])).astype(np.float32)
    y = rng.standard_normal((1, m["vec_dim"])).astype(np.float32)
    return {
        "img_ids": img_ids, "txt_ids": txt_ids,
        "txt": np.repeat(txt, batch, 0), "y": np.repeat(y, batch, 0),
        "guidance": np.full((batch,), guidance, np.float32),
    }


def win_rate_advantages_np(scores):
    """``[N, G]`` scores -> win-rate advantages (ties 1/2, ddof=1), numpy."""
    import numpy as np
    s = np.asarray(scores, np.float64)
    g = s.shape[1]
    p = (s[:, :, None] > s[:, None, :]) + 0.5 * (s[:, :, None] == s[:, None, :])
    p = p * (1 - np.eye(g))
    w = p.sum(-1) / (g - 1)
    return ((w - w.mean(1, keepdims=True)) / (w.std(1, ddof=1, keepdims=True) + 1e-8)).astype(
        np.float32)


# ---------------------------------------------------------------------------
# PyTorch reference (diffusers FluxTransformer2DModel + the reference's loops).


def diffusers_config(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "patch_size": 1, "in_channels": m["in_channels"], "out_channels": m["out_channels"],
        "num_layers": m["depth"], "num_single_layers": m["depth_single"],
        "attention_head_dim": m["hidden_size"] // m["num_heads"],
        "num_attention_heads": m["num_heads"], "joint_attention_dim": m["context_dim"],
        "pooled_projection_dim": m["vec_dim"], "guidance_embeds": m["guidance_embed"],
        "axes_dims_rope": list(m["axes_dim"]),
    }


def torch_setup(threads: int) -> Any:
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass
    return torch


def torch_build_flux(problem: Problem, seed: int = 0):
    """diffusers FluxTransformer2DModel with random weights moved off their init."""
    import diffusers
    import torch
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**diffusers_config(problem.model_kwargs()))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # zero-init layers (adaLN-out) get weights too
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def torch_velocity(model, x, t, cond_t, batch_slice=slice(None)):
    """diffusers forward with our argument convention (timestep in [0, 1])."""
    return model(
        hidden_states=x, encoder_hidden_states=cond_t["txt"][batch_slice],
        pooled_projections=cond_t["y"][batch_slice], timestep=t,
        img_ids=cond_t["img_ids"], txt_ids=cond_t["txt_ids"],
        guidance=cond_t["guidance"][batch_slice], return_dict=False,
    )[0]


def torch_flow_sde_step(x, v, sigma, sigma_next, sigma_max: float, eta: float,
                        generator=None, next_sample=None):
    """The reference's Flow-GRPO SDE step and its Gaussian log-prob, in torch.

    ``sigma``/``sigma_next`` are tensors broadcastable to ``x`` (``[B,1,1]``)
    so one code path serves per-image scalars and per-sample training batches.
    """
    import torch
    x, v = x.float(), v.float()
    dt = sigma_next - sigma
    denom = torch.where(sigma == 1.0, torch.full_like(sigma, sigma_max), sigma)
    std_t = torch.sqrt(sigma / (1.0 - denom)) * eta
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * torch.sqrt(-dt)
    if next_sample is None:
        next_sample = mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    log_prob = (-((next_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std)
                - math.log(math.sqrt(2 * math.pi)))
    return next_sample, log_prob.mean(dim=tuple(range(1, x.ndim)))


def sd3_sigmas(num_steps: int, shift: float = 3.0):
    """SD3-shifted ``linspace(1, 0, S + 1)`` (fp32), same as ``sampling.make_sigmas``."""
    import numpy as np
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)


# ---------------------------------------------------------------------------
# JAX helpers.


def jax_velocity_fn(graphdef):
    """``velocity_fn(params, x, t, cond)`` over an NNX FLUX graphdef (BFL call)."""
    from flax import nnx

    def velocity_fn(params, x, t, cond):
        model = nnx.merge(graphdef, params)
        return model(x, cond["img_ids"], cond["txt"], cond["txt_ids"], t, cond["y"],
                     cond["guidance"])
    return velocity_fn


def jax_cond(cond_np: dict[str, Any]) -> dict[str, Any]:
    """numpy cond (2-D ids) -> JAX pytree with batched ids, as our model wants."""
    import jax.numpy as jnp
    b = cond_np["txt"].shape[0]
    out = {k: jnp.asarray(v) for k, v in cond_np.items()}
    out["img_ids"] = jnp.broadcast_to(out["img_ids"], (b, *out["img_ids"].shape))
    out["txt_ids"] = jnp.broadcast_to(out["txt_ids"], (b, *out["txt_ids"].shape))
    return out


def jax_init_flux(problem: Problem, *, remat: bool = False,
                  remat_policy: str = "nothing_saveable", seed: int = 0):
    """(graphdef, params) of a randomly initialised NNX FLUX transformer."""
    from flax import nnx

    from prefgrpo_jax.models.flux import FluxConfig, FluxTransformer
    cfg = FluxConfig(**problem.model_kwargs())
    model = FluxTransformer(cfg, rngs=nnx.Rngs(seed), remat=remat, remat_policy=remat_policy)
    return nnx.split(model, nnx.Param)


def jax_abstract_flux(problem: Problem, *, remat: bool = False):
    """(graphdef, params as ShapeDtypeStructs): no memory allocated (for compile-only)."""
    from flax import nnx

    from prefgrpo_jax.models.flux import FluxConfig, FluxTransformer
    cfg = FluxConfig(**problem.model_kwargs())
    model = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0), remat=remat))
    return nnx.split(model, nnx.Param)


def xla_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, list):
        ca = ca[0] if ca else {}
    return float(ca["flops"]) if ca and "flops" in ca else None


# ---------------------------------------------------------------------------
# Results.


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, out_dir: str | Path, payload: dict[str, Any], md_body: str,
                  *, started: float, load_before: list[float], argv: list[str],
                  prog: str = "python -m experiments.benchmark") -> Path:
    """Writes ``<name>.json`` and ``<name>.md`` with the machine/provenance header."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "command": prog + " " + " ".join(shlex.quote(a) for a in argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "extra_xla_flags": list(extra_xla_flags()),
    }
    doc = {"meta": meta, **payload}
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    m = meta["machine"]
    header = (
        f"# Benchmark: {name}\n\n"
        f"Command: `{meta['command']}`  \n"
        f"Date (UTC): {meta['date_utc']}, took {meta['duration_s']} s  \n"
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}, {', '.join(m['cpu_simd'])}), "
        f"{m['ram_gib']} GiB RAM  \n"
        f"Load average (1/5/15 min) before: {load_before}, after: {meta['loadavg_after']}  \n"
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  \n"
        f"Git: {m['git']['commit'][:12]} ({m['git']['dirty_files']} uncommitted files)\n"
        + (f"Extra XLA flags of every JAX worker: `{' '.join(meta['extra_xla_flags'])}`\n"
           if meta["extra_xla_flags"] else "") + "\n"
    )
    (out / f"{name}.md").write_text(header + md_body.rstrip() + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m experiments.bench_common module:function in.json out.json")
    try:
        _worker_main(*sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
