"""experiments/gpu_check.py: the peak table, the refusal without a GPU, and a --smoke run on CPU."""

from __future__ import annotations

import json
import math

import jax
import pytest

from experiments import gpu_check


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("TPU v5p", 459.0),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_bf16_peak_by_device_kind(kind, tflops):
    want = None if tflops is None else tflops * 1e12
    assert gpu_check.bf16_peak(kind) == want


def test_full_sizes_refuse_to_run_without_a_gpu():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU is present: the full check would run")
    with pytest.raises(SystemExit, match="no GPU.*--smoke"):
        gpu_check.check(smoke=False, reps=1)


def test_slice_has_flux_dev_width():
    slice_ = gpu_check.CASES[1]
    m = slice_.model
    assert (m["hidden_size"], m["num_heads"], m["depth"], m["depth_single"], m["context_dim"]) == (3072, 24, 2, 2, 4096)
    assert slice_.grid == (45, 45) and slice_.text_len == 512 and slice_.group == 8  # 720 px: 90x90 latent


@pytest.mark.slow  # ~1-3 min on 2 shared cores: compiles both smoke models' sampler and train step
def test_smoke_run_writes_results(tmp_path):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--reps", "1"]) == 0
    doc = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert doc["meta"]["command"] == f"python -m experiments.gpu_check --smoke --out {tmp_path} --reps 1"
    assert doc["smoke"] and doc["compute_dtype"] == "bfloat16"
    assert set(doc["results"]) == {"medium", "flux_slice"}
    for r in doc["results"].values():
        for part, rate in (("sampling", "images_per_s"), ("training", "samples_per_s")):
            assert math.isfinite(r[part][rate]) and r[part][rate] > 0
            assert r[part]["flops"] > 0 and 0 < r[part]["mfu_vs_measured_peak"]
    md = (tmp_path / "gpu_check_smoke.md").read_text()
    assert "| medium |" in md and "| flux_slice |" in md
