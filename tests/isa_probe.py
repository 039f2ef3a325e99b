"""Worker target of tests/test_cpu_isa.py (run through ``bench_common.run_worker``).

``probe(use_torch)`` runs one small jitted matmul (so YNNPACK picks a kernel)
and, if asked, loads PyTorch, then returns what the worker's environment was;
``bench_common`` adds the worker's ISA record under ``_proc.isa``.
"""

import os


def probe(use_torch: bool) -> dict:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((64, 64), jnp.float32)
    total = float(jax.jit(jnp.dot)(a, a).sum())
    if use_torch:
        import torch  # noqa: F401 -- describe_worker reads its CPU capability
    return {"dot_sum": total,
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "BENCH_ISA", "ATEN_CPU_CAPABILITY",
                                                   "MKL_ENABLE_INSTRUCTIONS",
                                                   "ONEDNN_MAX_CPU_ISA")}}
