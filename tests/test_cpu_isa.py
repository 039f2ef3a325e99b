"""``--isa`` of ``python -m experiments.benchmark``: the chosen ISA reaches the
worker subprocess (environment, XLA flag, YNNPACK's kernel choice, PyTorch's
capability) and is recorded; ``both`` measures each ISA. No timings."""

from __future__ import annotations

import os

import pytest

from experiments import bench_common, benchmark, cpu_isa


def test_avx2_reaches_the_worker():
    r = bench_common.run_worker("tests.isa_probe:probe", {"use_torch": True}, threads=1,
                                isa="avx2")
    assert r["dot_sum"] == 64.0 * 64 * 64
    env = r["env"]
    assert cpu_isa.AVX2_XLA_FLAG in env["XLA_FLAGS"].split()
    assert env["BENCH_ISA"] == "avx2" and env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    rec = r["_proc"]["isa"]
    assert rec["isa"] == "avx2" and rec["cpu_flags"] == cpu_isa.cpu_flags()
    # YNNPACK runs on the AVX2 + FMA3 subset of what it detected (bits 7+ = AVX-512, AMX).
    assert rec["ynn_arch_flags_used"] == rec["ynn_arch_flags_detected"] & 0x7F
    assert rec["torch_cpu_capability"] in ("AVX2", "DEFAULT")  # never AVX512 under avx2


def test_native_worker_drops_the_parents_restriction(monkeypatch):
    # A parent shell restricted to AVX2 must not leak into a "native" worker.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    r = bench_common.run_worker("tests.isa_probe:probe", {"use_torch": False}, threads=1,
                                isa="native")
    assert r["env"]["ATEN_CPU_CAPABILITY"] is None and r["env"]["BENCH_ISA"] == "native"
    assert cpu_isa.AVX2_XLA_FLAG not in r["env"]["XLA_FLAGS"]
    assert "ynn_arch_flags_used" not in r["_proc"]["isa"]


def test_isa_option_reaches_run(monkeypatch, tmp_path):
    seen = []

    class Fake:  # stands in for a bench module: records what main hands it
        @staticmethod
        def run(size, out, threads, argv, isas=None):
            seen.append((isas, os.environ.get("BENCH_ISA")))
    monkeypatch.setattr(benchmark.importlib, "import_module", lambda name: Fake)
    monkeypatch.delenv("BENCH_ISA", raising=False)
    assert benchmark.main(["training", "--isa", "both", "--out", str(tmp_path)]) == 0
    assert benchmark.main(["pairs", "--isa", "avx2", "--out", str(tmp_path)]) == 0
    assert seen == [(("native", "avx2"), None), (None, "avx2")]
    assert "BENCH_ISA" not in os.environ  # restored after the run
    with pytest.raises(SystemExit):  # pairs measures one ISA per results file
        benchmark.main(["pairs", "--isa", "both", "--out", str(tmp_path)])


def test_xla_flags_option_reaches_the_worker(monkeypatch, tmp_path):
    flag = "--xla_cpu_multi_thread_eigen=false"
    seen = []

    class Fake:  # a bench module whose run starts a real worker
        @staticmethod
        def run(size, out, threads, argv, isas=None):
            seen.append(bench_common.run_worker("tests.isa_probe:probe", {"use_torch": False},
                                                threads=2, isa="native"))
    monkeypatch.setattr(benchmark.importlib, "import_module", lambda name: Fake)
    monkeypatch.delenv("BENCH_XLA_FLAGS", raising=False)
    assert benchmark.main(["training", "--out", str(tmp_path), f"--xla_flags={flag}"]) == 0
    assert seen[0]["env"]["XLA_FLAGS"].split() == [flag]
    assert "BENCH_XLA_FLAGS" not in os.environ  # restored after the run
    assert bench_common.extra_xla_flags() == ()


def test_worker_env_per_isa():
    native, avx2 = bench_common.worker_env(2), bench_common.worker_env(2, isa="avx2")
    assert cpu_isa.AVX2_XLA_FLAG not in native["XLA_FLAGS"] and "ATEN_CPU_CAPABILITY" not in native
    assert avx2["XLA_FLAGS"].split() == [cpu_isa.AVX2_XLA_FLAG]
    assert set(cpu_isa.WORKER_VARS) <= set(avx2)
    with pytest.raises(ValueError, match="--isa"):
        cpu_isa.expand("avx512")
