"""Smoke test of the benchmarks: every sub-benchmark at the tiny size, one thread.

Checks that each writes its JSON (with the machine / provenance header and the
expected result fields) and its markdown table. No timing assertions: the
numbers of a smoke run on a shared CI machine mean nothing.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from experiments import bench_common, benchmark  # noqa: E402
from prefgrpo_jax import program_analysis  # noqa: E402

pytestmark = pytest.mark.slow


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(name: str, out) -> dict:
    rc = benchmark.main([name, "--size", "tiny", "--out", str(out), "--threads", "1"])
    assert rc == 0
    doc = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# Benchmark: {name}") and "|---|" in md
    meta = doc["meta"]
    assert meta["command"].startswith(f"python -m experiments.benchmark {name}")
    m = meta["machine"]
    assert m["nproc"] >= 1 and m["cpu_model"] and m["ram_gib"] > 0
    assert m["versions"]["jax"] and len(meta["loadavg_before"]) == 3
    return doc


def test_sampling(tmp_path):
    doc = _run("sampling", tmp_path)
    assert doc["threads"]["threads"] == 1
    impls = [r["impl"] for r in doc["results"]]
    assert len(impls) == 3 and impls[0].startswith("jax")
    assert any("batch=G" in i for i in impls[1:]) and any("batch=1" in i for i in impls[1:])
    for r in doc["results"]:
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["first_call_s"])
        assert _finite_positive(r["peak_rss_mib"])
    assert _finite_positive(doc["results"][0]["compile_s"])
    assert all(r["isa"] == r["isa_used"]["isa"] == "native" for r in doc["results"])
    assert set(doc["ratios"]["native"]) == {"jax_speedup_vs_torch_batchG",
                                            "jax_speedup_vs_torch_batch1"}
    # Same weights in both frameworks: the velocities agree.
    parity = doc["parity"]["native"]
    assert parity["velocity_max_abs_err"] < 1e-3 * max(1.0, parity["velocity_max_abs"])


def test_training(tmp_path):
    doc = _run("training", tmp_path)
    assert len(doc["results"]) == 3
    for r in doc["results"]:
        assert _finite_positive(r["samples_per_s"]) and _finite_positive(r["peak_rss_mib"])
        assert _finite_positive(r["peak_rss_steps_mib"])
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["first_grad_norm"])
    jax_row, torch_rows = doc["results"][0], doc["results"][1:]
    for t in torch_rows:  # same batch, timesteps and weights -> same gradient
        assert t["first_grad_norm"] == pytest.approx(jax_row["first_grad_norm"], rel=1e-3)
    assert set(doc["ratios"]["native"]) == {"jax_speedup_vs_torch_batchB",
                                            "jax_speedup_vs_torch_batch1"}


def test_overlap(tmp_path):
    doc = _run("overlap", tmp_path)
    raw = doc["raw"]
    pairs = doc["config"]["prompts"] * 4 * 3 // 2  # G = 4 at the tiny size
    assert raw["pairs_per_step"] == pairs
    for variant in ("sequential", "overlapped"):
        x = doc["summary"][variant]
        assert _finite_positive(x["step_s"]) and x["judge_wait_s"] >= 0
        # Every pair of every group reached the fake judge, once, in every step.
        assert all(step["requests"] == pairs for step in raw["steps"][variant])
    # The judging is at least one wave of latency; sequentially the step waits for all of it.
    assert doc["summary"]["sequential"]["judge_wait_s"] >= doc["config"]["latency_s"]
    assert _finite_positive(doc["speedup"])


def test_lora(tmp_path):
    doc = _run("lora", tmp_path)
    full, lora = doc["results"]
    for r in (full, lora):
        assert _finite_positive(r["steady_s"]) and _finite_positive(r["compile_s"])
    # Only the adapters are trained: far fewer parameters and Adam moments.
    assert 0 < lora["trained_params"] < full["trained_params"]
    assert 0 < doc["ratios"]["optimizer_state_fraction"] < 1


def test_pairs(tmp_path):
    doc = _run("pairs", tmp_path)
    groups = [r["group"] for r in doc["results"]]
    assert groups == sorted(groups) and len(groups) >= 2
    for r in doc["results"]:
        g = r["group"]
        assert r["pairs"] == g * (g - 1) // 2
        assert r["vectorised"]["image_encodings"] == g
        assert r["naive_batched"]["image_encodings"] == g * (g - 1)
        assert _finite_positive(r["vectorised"]["pairs_per_s"])
        assert _finite_positive(r["naive_batched"]["pairs_per_s"])
        assert r["max_abs_diff_naive_vs_vectorised"] < 1e-4
    assert "vectorised_time_ratio" in doc["growth"]


def test_mfu(tmp_path):
    doc = _run("mfu", tmp_path)
    for dt in ("float32", "bfloat16"):
        assert _finite_positive(doc["peak"][dt]["best_gflops"])
    for step in ("sampling", "training"):
        r = doc[step]
        assert _finite_positive(r["flops_jaxpr"]) and _finite_positive(r["flops_analytic"])
        assert r["flops_jaxpr"] == pytest.approx(r["flops_analytic"], rel=0.05)
        assert _finite_positive(r["mfu_vs_fp32_peak"])
        assert r["unknown_while_loops"] == 0


def test_memory(tmp_path):
    doc = _run("memory", tmp_path)
    entries = doc["results"]
    assert {(e["model"], e["remat"]) for e in entries} == {("tiny", False), ("tiny", True)}
    for e in entries:
        assert [r["group"] for r in e["compile_only"]] == [1, 2]
        for r in e["compile_only"]:
            assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0
        assert _finite_positive(e["run"]["peak_rss_steps_mib"])
        assert "max_group" in e["fit"] and "bytes_per_sample" in e["fit"]
    assert doc["flux_dev_compile_only"] is None  # medium size only


def test_scaling(tmp_path):
    doc = _run("scaling", tmp_path)
    rs = doc["results"]
    assert [r["n_devices"] for r in rs] == [1, 2]
    for r in rs:
        assert r["batch"] == r["n_devices"] * doc["config"]["per_device"]
        assert r["latents_shard_shape"][0] == doc["config"]["per_device"]
        assert _finite_positive(r["step_time_s"]) and r["log_probs_finite"]
        assert sum(r["collectives_in_hlo"].values()) == 0
    assert rs[0]["weak_scaling_efficiency"] == 1.0


def test_flop_counter_matches_analytic():
    """The jaxpr FLOP counter against the analytic FLUX count (no subprocess)."""
    import jax
    import jax.numpy as jnp

    prob = bench_common.PROBLEMS["tiny"]
    graphdef, params = bench_common.jax_abstract_flux(prob)
    vf = bench_common.jax_velocity_fn(graphdef)
    cond = bench_common.jax_cond(bench_common.make_cond_np(prob, 3))
    x = jnp.zeros((3, prob.num_img_tokens, 64))
    counted = program_analysis.jaxpr_flops(jax.make_jaxpr(vf)(params, x, jnp.ones((3,)), cond))
    analytic = bench_common.forward_flops(prob.model_kwargs(), 3, prob.num_img_tokens,
                                          prob.text_len)
    assert counted["dot_flops"] == pytest.approx(analytic["total"], rel=1e-9)
    n = sum(int(a.size) for a in jax.tree.leaves(params))
    assert n == bench_common.count_params(prob.model_kwargs())


def test_profile(tmp_path):
    rc = benchmark.main(["profile", "--size", "tiny", "--out", str(tmp_path), "--threads", "1"])
    assert rc == 0
    doc = json.loads((tmp_path / "profile.json").read_text())["by_isa"]["native"]
    for fw in ("jax", "torch"):
        assert _finite_positive(doc[fw]["fwd_s"]) and _finite_positive(doc[fw]["fwd_bwd_s"])
        assert _finite_positive(doc[fw]["fwd_bwd_cpu_util"])
    assert doc["jax"]["top_ops"] and doc["torch"]["forward_top_ops"]
    assert _finite_positive(doc["gemm_fp32"]["jax_gflops"])
