"""``--mode=plan`` end to end on simulated devices, and its does-not-fit exit."""

from __future__ import annotations

import json
import subprocess

import pytest

from prefgrpo_jax import plan, program_analysis
from train_helpers import REPO, env, main_command, write_test_config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from pipeline_fixture import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.mark.slow
def test_plan_reports_memory_flops_and_collectives_on_simulated_devices(tiny_flux_dir, clip_dir, tmp_path):
    """The fixture's programs compiled for 4 simulated devices (~1 min): the report
    has every figure, weights are gathered, and the sharded weights' gradients
    are found among the training all-reduces."""
    config = write_test_config(tmp_path / "cfg.py", tiny_flux_dir, clip_dir, tmp_path / "prompts.txt")
    workdir = tmp_path / "plan"
    proc = subprocess.run(
        main_command(config, workdir, "--mode=plan", "--config.plan.devices=4",
                     "--config.plan.device_memory_gib=1", "--config.sharding.fsdp_min_size=256"),
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((workdir / "plan.json").read_text())
    assert report["devices"] == 4 and report["fits"]
    g = report["per_device_gib"]
    assert g["peak"] == max(g["peak while sampling"], g["peak while training"]) > g["params (fp32 master)"] > 0
    coll = report["collective_gb_per_step_per_device"]
    assert coll["by kind (sampling)"]["all-gather"] > 0
    grads = coll["by kind (training)"][program_analysis.GRADIENT_ALL_REDUCE]
    assert grads > 0
    # As reduce-scatters the gradients move one shard (of 4) instead of the whole.
    pod = coll["training (gradient all-reduces as reduce-scatters)"]
    assert pod == pytest.approx(coll["training"] - grads * (1 - 1 / 4), rel=1e-6)
    assert report["tflop_per_step"] > 0
    assert "fits" in (workdir / "plan.md").read_text()


def test_plan_that_does_not_fit_exits_1_naming_the_fixes(monkeypatch, tmp_path):
    report = {
        "fits": False, "lora": False, "usable_fraction": 0.9, "device_memory_gib": 80.0, "devices": 2, "mesh": {"fsdp": 2},
        "model": "flux1-dev", "images_per_step": 16, "resolution": [720, 720], "tokens": {"image": 2025, "text": 512},
        "per_device_gib": {"params (fp32 master)": 22.0, "optimizer state": 44.0, "peak while training": 131.8,
                           "peak while sampling": 106.8, "peak": 131.8},
        "tflop_per_step": 1.0, "tflop_per_step_per_device": 0.5, "headroom_gib": -59.8,
        "collective_gb_per_step_per_device": {
            "sampling": 1.0, "training": 2.0, "training (gradient all-reduces as reduce-scatters)": 1.5,
            "FSDP floor (sampling)": 1.0, "FSDP floor (training)": 1.0},
        "compile_seconds": {"sampling": 1.0, "training": 1.0}, "not_counted": "-",
    }
    monkeypatch.setattr(plan, "build_report", lambda config: report)
    with pytest.raises(plan.PlanDoesNotFitError, match=r"does not fit: peak 131.80 GiB .* LoRA") as err:
        plan.plan(None, tmp_path)
    assert err.value.code != 0
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is False
