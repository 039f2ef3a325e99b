"""The state layer: born sharded, restored without optimizer state, preemption-aware."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prefgrpo_jax import checkpoint, config as config_lib, grpo, state as state_lib
from prefgrpo_jax.models import flux
from train_helpers import env, write_test_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mid_flux_dir(tmp_path_factory):
    """A 56 M-parameter FLUX transformer in bf16 (the real checkpoints' dtype)."""
    from prefgrpo_jax import export

    cfg = flux.FluxConfig.tiny(hidden_size=512, num_heads=4, depth=4, depth_single=8,
                               axes_dim=(16, 56, 56), context_dim=256, vec_dim=64)
    model = flux.FluxTransformer(cfg, rngs=nnx.Rngs(0))
    out = tmp_path_factory.mktemp("mid_flux") / "transformer"
    export.save_transformer(model, out, dtype=jnp.bfloat16)
    return out


def _probe(kind: str, flux_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "state_probe.py"), kind, str(flux_dir)],
                          env=env(devices=8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_and_init_never_build_a_full_leaf_on_one_device(mid_flux_dir):
    sharded = _probe("sharded", mid_flux_dir)
    assert sharded["devices"] == 8
    assert sharded["params_born_sharded"] and sharded["state_born_sharded"]
    # Every FSDP-sharded leaf: each device holds 1/8 of it, never the whole.
    assert sharded["largest_device_fraction"] == pytest.approx(1 / 8)
    # Peak process memory over the loading: the sharded train state (params + 2
    # Adam moments, 3x the fp32 params) plus the memory-mapped bf16 file (0.5x)
    # and slack. Measured (2026-12-03): 3.8x sharded, 7.2x for the old path
    # (whole model on one device, cast, init, then re-sharded).
    bound = 4.5 * sharded["params_fp32_bytes"]
    old = _probe("old", mid_flux_dir)
    assert sharded["rss_growth_bytes"] < bound, sharded
    assert old["rss_growth_bytes"] > bound, old


def _tiny_params():
    model = flux.FluxTransformer(flux.FluxConfig.tiny(), rngs=nnx.Rngs(1))
    return nnx.split(model)


def test_restore_params_reads_no_optimizer_state(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    graphdef, params = _tiny_params()
    state = grpo.init_train_state(params, optax.adamw(1e-3))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=2, save_every=1)
    ckpt.save(3, state, {"step": 3})
    ckpt.close()

    seen = []
    original = ocp.CheckpointManager.restore

    def spy(self, step, args=None, **kw):
        seen.append(args)
        return original(self, step, args=args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=2, save_every=1)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=a.sharding), params)
    restored = ckpt.restore_params(like)
    ckpt.close()
    # The only restore asked for the params subtree (and the small JSON meta, whose
    # tensor format is checked), no optimizer state.
    (args,) = seen
    assert set(args.keys()) == {"state", "meta"}
    assert set(args["state"].item.keys()) == {"params"}
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


def _load_config(path: Path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def trained_workdir(tiny_flux_dir, tmp_path_factory):
    """A 2-step run stopped by JAX's preemption sync point at step 1 (in process)."""
    from pipeline_fixture import save_tiny_clip

    from prefgrpo_jax import train

    d = tmp_path_factory.mktemp("preempt")
    config = _load_config(write_test_config(d / "config.py", tiny_flux_dir, save_tiny_clip(d / "clip"),
                                            d / "prompts.txt", total_steps=2, checkpoint_every=5,
                                            params_checkpoint_every=1))
    work = d / "work"
    original = checkpoint.Checkpointer.reached_preemption
    checkpoint.Checkpointer.reached_preemption = lambda self, step: step == 1
    try:
        train.Trainer(config, work).run()
    finally:
        checkpoint.Checkpointer.reached_preemption = original
    return config, work


def test_preemption_sync_point_checkpoints_and_stops(trained_workdir):
    _, work = trained_workdir
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    # checkpoint_every=5, yet the preemption step was saved (full state) ...
    assert {p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()} == {"1"}
    # ... and the params-only kind every step.
    assert {p.name for p in (work / "params_checkpoints").iterdir() if p.name.isdigit()} == {"1"}
    assert not (work / "export").exists()


def test_sample_restores_params_only(trained_workdir, monkeypatch):
    config, work = trained_workdir

    def no_full_restore(*args, **kwargs):
        raise AssertionError("sample/eval must not restore the optimizer state")

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", no_full_restore)
    pipe, step = state_lib.load_trained_pipeline(config_lib.RunConfig.from_dict(config), work)
    assert step == 1
    _, params = nnx.split(pipe.transformer)
    ckpt = checkpoint.Checkpointer(work / "checkpoints", keep=2, save_every=1)
    want = ckpt.restore_params(params)
    ckpt.close()
    for got, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.dtype == jnp.dtype(config.model.dtype)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))


def test_flux_config_lays_out_on_8_to_64_devices_and_bad_layouts_name_a_fix():
    from prefgrpo_jax import config as config_lib

    spec = importlib.util.spec_from_file_location("flux_cfg", REPO / "configs" / "flux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.plan.preset = "flux1-dev"
    for n in (8, 16, 32, 64):
        resolved = config_lib.build(c, mode="plan", num_devices=n)
        # The reference's per-rank batch: one prompt x 8 images per device, two
        # updates of 4 samples, each trained one sample per device at a time.
        assert resolved.train.prompts_per_step == n
        assert resolved.train.micro_batches == 4
    c.train.prompts_per_device = 0
    c.train.prompts_per_step = 3
    with pytest.raises(config_lib.ConfigError, match=r"prompts_per_step=3: .* use a multiple of 2"):
        config_lib.build(c, mode="plan", num_devices=8)
    c.train.prompts_per_step = 8
    c.train.micro_batches = 3
    with pytest.raises(config_lib.ConfigError, match=r"micro_batches=3: .*valid here: \[1, 2, 4\]"):
        config_lib.build(c, mode="plan", num_devices=8)
