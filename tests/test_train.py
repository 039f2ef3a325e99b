"""The training program: validation messages, end to end, exact resume, sharding."""

import dataclasses
import importlib.util
import signal
import subprocess
import time

import numpy as np
import pytest

from prefgrpo_jax import config as config_lib
from prefgrpo_jax import lora
from prefgrpo_jax.train import TIMING_KEYS
from prefgrpo_jax.train_logging import reward_trend
from train_helpers import REPO, env, main_command, metrics, run_main, write_test_config


def load_tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture
def tiny_config(tiny_flux_dir):
    """configs/tiny.py pointed at the fixture pipeline (valid as it stands)."""

    def make():
        c = load_tiny_config()
        c.model.path = str(tiny_flux_dir)
        return c

    return make


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from pipeline_fixture import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def test_config(tiny_flux_dir, clip_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    return write_test_config(d / "config.py", tiny_flux_dir, clip_dir, d / "prompts.txt")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.group_size", 1, "config.train.group_size=1: must be an integer >= 2"),
        ("train.clip_range", 0.0, "config.train.clip_range=0.0: must be > 0"),
        ("train.timestep_fraction", 1.5, "config.train.timestep_fraction=1.5: must be in (0, 1]"),
        ("train.timestep_fraction", 0.0, "config.train.timestep_fraction=0.0: must be in (0, 1]"),
        ("train.step_mode", "ddim", "config.train.step_mode='ddim': must be one of ('flow', 'dance', 'cps')"),
        ("train.num_steps", 1, "config.train.num_steps=1: must be an integer >= 2"),
        ("train.height", 30, "config.train.height=30: must be a positive multiple of 16"),
        ("train.timestep_chunk", 4, "config.train.timestep_chunk=4: must divide the 5 trained timesteps"),
        ("model.path", "/nonexistent/flux", "config.model.path='/nonexistent/flux': must be a local diffusers-format FLUX directory"),
        ("model.dtype", "float16", "config.model.dtype='float16': must be one of ('float32', 'bfloat16')"),
        ("model.remat_policy", "all", "config.model.remat_policy='all': must be one of ('nothing_saveable',"),
        ("total_steps", 0, "config.total_steps=0: must be an integer >= 1"),
        ("checkpoint_every", 0, "config.checkpoint_every=0: must be an integer >= 1 (steps)"),
        ("optim.learning_rate", -1.0, "config.optim.learning_rate=-1.0: must be > 0"),
        ("mesh.fsdp", 0, "config.mesh.fsdp=0: must be a positive integer or -1"),
        ("reward.monitor", "clip", "config.reward.monitor='clip': must be empty or one of the sources"),
        ("train.updates_per_rollout", 3, "config.train.updates_per_rollout=3: must be an integer >= 1 dividing train.group_size=8"),
        ("train.reward_image", "final", "config.train.reward_image='final': must be one of ('x0_pred', 'sample')"),
        ("train.adv_norm", "global", "config.train.adv_norm='global': must be one of ('group', 'group_global_std', 'batch')"),
        ("train.kl_form", "sd3", "config.train.kl_form='sd3': must be one of ('prefgrpo', 'flowgrpo')"),
        ("train.cfg_scale", 0.5, "config.train.cfg_scale=0.5: must be >= 1.0"),
        ("optim.schedule", "linear", "config.optim.schedule='linear': must be one of ('constant', 'cosine')"),
        ("ema.decay", 1.0, "config.ema.decay=1.0: must be in [0, 1)"),
        ("ema.use", True, "config.ema.use=True: True needs ema.decay > 0"),
        ("train.sde_window", 10, "config.train.sde_window=10: must be 0 (every step stochastic) or the size of the SDE window, at most num_steps - 1 = 9"),
    ],
)
def test_validation_error_names_field_value_and_fix(tiny_config, field, value, message):
    c = tiny_config()
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c, num_devices=1)
    assert message in str(err.value)


def test_every_field_is_required_and_named_when_missing(tiny_config):
    """A field's default lives in base_config() alone: a config without it (e.g.
    written for an older version) is refused by name, never read with a fallback."""
    assert "model.attention" in config_lib.field_paths()
    c = tiny_config()
    del c.model["attention"]
    del c.ema["use"]
    with pytest.raises(config_lib.ConfigError, match=r"missing fields: config\.ema\.use, config\.model\.attention \(build"):
        config_lib.validate(c, num_devices=1)


def test_unknown_fields_are_refused_by_name(tiny_config):
    """A typo'd field in a config file is an error, not silently ignored."""
    c = tiny_config()
    c.train.learning_rate = 1e-3  # belongs to optim
    c.reward.gpdo = True
    with pytest.raises(config_lib.ConfigError, match=r"unknown fields: config\.reward\.gpdo, config\.train\.learning_rate"):
        config_lib.validate(c, num_devices=1)


def test_typed_config_is_built_once_and_round_trips(tiny_config):
    """build() gives one frozen, typed object per section; its dict is the ConfigDict's."""
    import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the verifier rewards)

    c = tiny_config()
    c.train.prompts_per_device, c.train.micro_batches = 0, 0
    run = config_lib.build(c, num_devices=1)
    assert isinstance(run.train, config_lib.TrainConfig) and isinstance(run.model.lora, config_lib.LoraConfig)
    assert run.model.lora.spec() is None and run.mesh.sizes() == dict(c.mesh)
    per_update = c.train.prompts_per_step * c.train.group_size // c.train.updates_per_rollout
    assert run.train.micro_batches == per_update  # derived for one device: one sample per micro-batch
    assert run.to_dict() == {**c.to_dict(), "train": {**c.train.to_dict(), "micro_batches": per_update}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.group_size = 4
    assert config_lib.build(run, num_devices=1) == run
    assert config_lib.base_config().to_dict() == config_lib.RunConfig().to_dict()


def test_mode_sections_are_checked_in_their_mode_only(tiny_config):
    """sample.* is checked by --mode=sample (it used to run with no validation), plan.* by
    --mode=plan; a train run never fails on them."""
    c = tiny_config()
    c.sample.prompts, c.plan.devices = [], 0
    with pytest.raises(config_lib.ConfigError, match=r"config\.sample\.prompts=\[\]: must be a non-empty list"):
        config_lib.build(c, mode="sample")
    with pytest.raises(config_lib.ConfigError, match=r"config\.plan\.devices=0: must be an integer >= 1"):
        config_lib.build(c, mode="plan")
    import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the verifier rewards)

    config_lib.build(c, mode="train", num_devices=1)


def test_grad_accum_names_its_replacements(tiny_config):
    c = tiny_config()
    c.train.grad_accum = 4
    with pytest.raises(config_lib.ConfigError, match="grad_accum was renamed: set config.train.micro_batches"):
        config_lib.validate(c, num_devices=1)


def test_unknown_reward_and_batch_divisibility(tiny_config):
    import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the verifier rewards)

    c = tiny_config()
    c.reward.spec = {"hps": 1.0}
    c.reward.monitor = ""
    with pytest.raises(config_lib.ConfigError, match=r"config.reward.spec=\{'hps': 1.0\}: .*unknown \['hps'\], known: \["):
        config_lib.validate(c, num_devices=1)
    c = tiny_config()
    config_lib.validate(c, num_devices=1)  # the shipped tiny config is valid
    c.train.prompts_per_step = 3
    c.train.group_size = 2
    c.mesh.fsdp = -1
    with pytest.raises(config_lib.ConfigError, match=r"prompts_per_step=3: x group_size 2 / updates_per_rollout 2 = 3 samples per update, not divisible by the 4 data-parallel devices .* use a multiple of 4"):
        config_lib.validate(c, num_devices=4)
    c = tiny_config()
    c.mesh.data = 3
    with pytest.raises(config_lib.ConfigError, match=r"2 devices are not divisible by the fixed axes"):
        config_lib.validate(c, num_devices=2)
    c.mesh.fsdp = 1
    with pytest.raises(config_lib.ConfigError, match="needs 3 devices, but 2 are available"):
        config_lib.validate(c, num_devices=2)
    # Several problems are reported together.
    c = tiny_config()
    c.train.group_size = 1
    c.train.clip_range = -1.0
    with pytest.raises(config_lib.ConfigError, match="2 invalid config field"):
        config_lib.validate(c, num_devices=1)


def test_reward_trend_averages_first_and_last_quarter():
    rows = [{"step": i + 1, "reward_mean": float(i)} for i in range(100)]
    assert reward_trend(rows) == ("reward_mean: 7.5000 (mean of the first 16 logged steps) -> "
                                  "91.5000 (mean of the last 16), +84.0000")
    assert reward_trend(rows[:8]).startswith("reward_mean: 0.5000 (mean of the first 2 ")
    assert reward_trend(rows[:1]) is None


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_metrics(rows_a, rows_b, steps):
    """Every non-timing metric agrees; sharded reductions reorder float sums, so
    agreement is to 1e-4 relative, 1e-6 absolute."""
    a, b = comparable(rows_a), comparable(rows_b)
    assert len(a) == len(b) == steps
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=k)


# eval.every on the fixed toy subset (configs/tiny.py sets it; shortened to this run).
EVAL_EVERY = ("--config.eval.every=2", "--config.eval.every_prompts=5", "--config.eval.num_steps=2",
              "--config.eval.batch_size=5")


# LoRA: adapters on the reference's targets plus proj_mlp/proj_out (every layout),
# a KL term to the adapters-off reference, the merged transformer exported too.
LORA = ("--config.model.lora.rank=4", "--config.model.lora.alpha=8.0", "--config.train.kl_beta=0.01",
        "--config.model.lora.targets=" + repr(tuple(lora.REFERENCE_TARGETS) + ("proj_mlp", "proj_out")),
        "--config.export.lora_merged=True")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), LORA], ids=["full", "lora"])
def test_end_to_end_outputs_and_exact_resume_after_sigkill(test_config, tmp_path, extra):
    full = tmp_path / "full"
    proc = run_main(test_config, full, *EVAL_EVERY, *extra)
    assert "memory estimate per device" in proc.stdout and "ETA" in proc.stdout
    rows = metrics(full)
    assert reward_trend(rows) in proc.stdout  # the run ends with the monitored reward's trend
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("loss", "reward_mean", "grad_norm", "clip_fraction", "approx_kl", "ratio_mean", "step_time_s"):
            assert key in r and np.isfinite(r[key]), key
    assert any(r["grad_norm"] > 0 for r in rows)
    assert [r["step"] for r in rows if "eval/overall" in r] == [2, 4]
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (full / "images").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    assert {p.name for p in (full / "checkpoints").iterdir() if p.name.isdigit()} >= {"2", "4"}
    # The trained transformer is exported in diffusers format and loads back.
    from prefgrpo_jax.models import flux

    exported = flux.load_diffusers(full / "export" / "transformer")
    assert exported.cfg.hidden_size == 32
    if extra:  # only the adapters were trained and checkpointed; they are exported for peft
        assert "frozen transformer base (LoRA)" in proc.stdout
        assert (full / "export" / "lora" / lora.WEIGHT_NAME).is_file()
        assert max(r["kl_ref"] for r in rows) > 0
        # --mode=sample restores the adapters and merges them into the base.
        sampled = run_main(test_config, full, "--mode=sample", *extra)
        assert "restored the transformer of step 4" in sampled.stderr

    # Same command, killed with SIGKILL once the step-2 checkpoint exists, then rerun.
    resumed = tmp_path / "resumed"
    killed = subprocess.Popen(main_command(test_config, resumed, *EVAL_EVERY, *extra), cwd=REPO, env=env(1),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "2").is_dir():
        assert killed.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (resumed / "metrics.jsonl").exists()
    proc = run_main(test_config, resumed, *EVAL_EVERY, *extra)
    assert "resumed from checkpoint" in proc.stderr
    assert comparable(metrics(resumed)) == comparable(rows)


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(test_config, tmp_path):
    work = tmp_path / "term"
    proc = subprocess.Popen(main_command(test_config, work, "--config.checkpoint_every=100"), cwd=REPO,
                            env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (work / "metrics.jsonl").exists() or not (work / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    steps = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) < 4, "a preempted run must checkpoint where it stopped"
    assert "preemption signal" in stderr


@pytest.mark.slow
def test_eight_simulated_devices_match_one(test_config, tmp_path):
    one = tmp_path / "one"
    eight = tmp_path / "eight"
    overrides = ("--config.total_steps=2", "--config.image_every=0")
    # 4 prompts x 4 images: each of the 2 updates per rollout has 8 samples, one per device.
    overrides += ("--config.train.prompts_per_step=4",)
    run_main(test_config, one, *overrides, devices=1)
    proc = run_main(test_config, eight, *overrides, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                    "--config.sharding.fsdp_min_size=64", devices=8)
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in proc.stdout
    assert_same_metrics(metrics(one), metrics(eight), steps=2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one_process(test_config, tmp_path):
    overrides = ("--config.total_steps=2", "--config.image_every=0")
    single = tmp_path / "single"
    run_main(test_config, single, *overrides, devices=2)
    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(
            main_command(
                test_config, multi, *overrides, "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                "--config.distributed.cpu_collectives=True",
            ),
            cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert "2 process(es)" in outputs[0][0]
    assert "memory estimate" not in outputs[1][0] and "ETA" not in outputs[1][0], \
        "only process 0 prints the summary and progress"
    assert_same_metrics(metrics(single), metrics(multi), steps=2)
