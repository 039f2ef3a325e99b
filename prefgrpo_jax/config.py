"""Config validation, run once before anything is compiled or loaded.

Every problem is one line naming the field, the bad value and what is allowed;
all problems are reported together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from prefgrpo_jax import sampling
from prefgrpo_jax.models.flux import REMAT_POLICIES

MODES = ("train", "sample", "eval")
DTYPES = ("float32", "bfloat16")
EVAL_JUDGES = ("toy_verifier", "vlm_judge")


class ConfigError(ValueError):
    """The config cannot run; the message lists every bad field."""


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict, *, mode: str = "train", num_devices: int | None = None) -> None:
    """Raises ConfigError listing every invalid field (no-op for a valid config)."""
    problems: list[str] = []

    def check(field: str, ok: bool, allowed: str) -> None:
        if not ok:
            try:
                raw = _get(config, field)
                value = repr(raw.to_dict() if hasattr(raw, "to_dict") else raw)
            except (KeyError, AttributeError):
                value = "<missing>"
            problems.append(f"config.{field}={value}: {allowed}")

    required = [
        "seed", "total_steps", "checkpoint_every", "keep_checkpoints", "log_every", "image_every",
        "model.path", "model.dtype", "data.prompts", "train.prompts_per_step", "train.group_size",
        "train.num_steps", "train.eta", "train.step_mode", "train.schedule", "train.height",
        "train.width", "train.timestep_fraction", "train.clip_range", "train.adv_clip_max",
        "train.kl_beta", "train.grad_accum", "train.timestep_chunk", "optim.learning_rate",
        "reward.spec", "mesh.data", "mesh.fsdp", "mesh.tensor",
    ]
    missing = []
    for field in required:
        try:
            _get(config, field)
        except (KeyError, AttributeError):
            missing.append(field)
    if missing:
        raise ConfigError(
            "config is missing fields: " + ", ".join(f"config.{f}" for f in missing)
            + " (start from configs/tiny.py or configs/flux.py)"
        )
    if mode not in MODES:
        problems.append(f"--mode={mode!r}: must be one of {MODES}")

    t = config.train
    check("seed", isinstance(config.seed, int) and config.seed >= 0, "must be an integer >= 0")
    check("total_steps", isinstance(config.total_steps, int) and config.total_steps >= 1, "must be an integer >= 1")
    check("checkpoint_every", isinstance(config.checkpoint_every, int) and config.checkpoint_every >= 1, "must be an integer >= 1 (steps)")
    check("keep_checkpoints", config.keep_checkpoints >= 1, "must be >= 1")
    check("log_every", config.log_every >= 1, "must be >= 1")
    check("image_every", config.image_every >= 0, "must be >= 0 (0 = never)")
    check("model.dtype", config.model.dtype in DTYPES, f"must be one of {DTYPES}")
    check("model.remat_policy", config.model.get("remat_policy", REMAT_POLICIES[0]) in REMAT_POLICIES,
          f"must be one of {REMAT_POLICIES}")
    path = Path(str(config.model.path)) if config.model.path else None
    check("model.path", path is not None and (path / "model_index.json").is_file(),
          "must be a local diffusers-format FLUX directory containing model_index.json "
          "(set --config.model.path=/path/to/FLUX.1-dev)")
    check("train.group_size", isinstance(t.group_size, int) and t.group_size >= 2,
          "must be an integer >= 2 (win rates compare images within a group)")
    check("train.prompts_per_step", isinstance(t.prompts_per_step, int) and t.prompts_per_step >= 1,
          "must be an integer >= 1")
    check("train.num_steps", isinstance(t.num_steps, int) and t.num_steps >= 2,
          "must be an integer >= 2 (the last step is never trained)")
    check("train.eta", t.eta > 0, "must be > 0 (the SDE needs noise for log-probabilities)")
    check("train.step_mode", t.step_mode in sampling.STEP_MODES, f"must be one of {sampling.STEP_MODES}")
    check("train.schedule", t.schedule in sampling.SCHEDULES, f"must be one of {sampling.SCHEDULES}")
    check("train.timestep_fraction", 0 < t.timestep_fraction <= 1, "must be in (0, 1]")
    check("train.clip_range", t.clip_range > 0, "must be > 0 (PPO ratio clip eps; 1e-4 in the Pref-GRPO recipe)")
    check("train.adv_clip_max", t.adv_clip_max is None or t.adv_clip_max > 0, "must be > 0 or None")
    check("train.kl_beta", t.kl_beta >= 0, "must be >= 0")
    check("train.grad_accum", isinstance(t.grad_accum, int) and t.grad_accum >= 1, "must be an integer >= 1")
    check("train.timestep_chunk", isinstance(t.timestep_chunk, int) and t.timestep_chunk >= 1, "must be an integer >= 1")
    for side in ("height", "width"):
        check(f"train.{side}", isinstance(t[side], int) and t[side] > 0 and t[side] % 16 == 0,
              "must be a positive multiple of 16 (VAE factor 8 x 2x2 packing for FLUX; 16 is also safe for the toy VAE)")
    if isinstance(t.num_steps, int) and t.num_steps >= 2 and 0 < t.timestep_fraction <= 1 \
            and isinstance(t.timestep_chunk, int) and t.timestep_chunk >= 1:
        k = max(1, int(t.timestep_fraction * (t.num_steps - 1)))
        check("train.timestep_chunk", k % t.timestep_chunk == 0,
              f"must divide the {k} trained timesteps per sample (timestep_fraction x (num_steps - 1))")
    check("optim.learning_rate", config.optim.learning_rate > 0, "must be > 0")
    check("optim.weight_decay", config.optim.weight_decay >= 0, "must be >= 0")
    check("optim.max_grad_norm", config.optim.max_grad_norm is None or config.optim.max_grad_norm > 0, "must be > 0 or None")
    _check_guards(config, check)

    from prefgrpo_jax.rewards import registry

    spec = config.reward.spec.to_dict() if hasattr(config.reward.spec, "to_dict") else dict(config.reward.spec)
    known = registry.known_rewards()
    unknown = sorted(k for k in spec if k not in known)
    check("reward.spec", bool(spec) and not unknown,
          f"must map known reward backends to weights; unknown {unknown}, known: {known}")
    monitor = config.reward.get("monitor", "")
    check("reward.monitor", not monitor or monitor in spec,
          f"must be empty or one of the sources in reward.spec {sorted(spec)}")
    options = config.reward.get("options") or {}
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    check("reward.options", not set(options) - set(spec),
          f"names sources {sorted(set(options) - set(spec))} that reward.spec {sorted(spec)} does not use")
    for name in sorted(set(spec) & set(known)):
        problems.extend(registry.option_problems(name, options.get(name, {})))
    if "vlm_judge" in spec:
        problems.extend(judge_option_problems(config.reward.get("options", {}).get("vlm_judge"),
                                              "reward.options.vlm_judge"))

    if mode == "eval":
        e = config.eval
        check("eval.judge", e.judge in EVAL_JUDGES, f"must be one of {EVAL_JUDGES}")
        for field in ("images_per_prompt", "num_steps", "batch_size"):
            check(f"eval.{field}", isinstance(e[field], int) and e[field] >= 1, "must be an integer >= 1")
        if e.judge == "vlm_judge":
            check("eval.prompts", bool(e.prompts) and Path(str(e.prompts)).is_file(),
                  "must be an existing JSONL file of {\"prompt\", \"dimension\", \"testpoints\"} "
                  "objects (see prefgrpo_jax/evaluate.py)")
            problems.extend(judge_option_problems(e.vlm_judge, "eval.vlm_judge"))
        elif e.judge == "toy_verifier":
            check("eval.prompts_per_dimension", isinstance(e.prompts_per_dimension, int)
                  and e.prompts_per_dimension >= 1, "must be an integer >= 1")

    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        check(f"mesh.{axis}", isinstance(size, int) and (size >= 1 or size == -1),
              "must be a positive integer or -1 (all remaining devices)")
    if num_devices is not None and not problems:
        from prefgrpo_jax import sharding

        try:
            shape = sharding.mesh_shape(dict(config.mesh), num_devices)
        except ValueError as err:
            problems.append(str(err))
        else:
            parallel = shape[0] * shape[1]
            batch = t.prompts_per_step * t.group_size
            check("train.prompts_per_step", batch % (parallel * t.grad_accum) == 0,
                  f"prompts_per_step x group_size = {batch} must be divisible by the data-parallel "
                  f"size {parallel} (mesh.data x mesh.fsdp) times grad_accum={t.grad_accum}")
    if problems:
        raise ConfigError(f"{len(problems)} invalid config field(s):\n  " + "\n  ".join(problems))


def judge_option_problems(options: Any, field: str) -> list[str]:
    """Problems of a VLM judge's options (``base_url``, ``model``, ``api_key_env``).

    ``api_key_env`` is never echoed: a key pasted there by mistake must not reach a log.
    """
    if options is None or not hasattr(options, "get"):
        return [f"config.{field} is missing: the judge needs at least base_url and model, e.g. "
                f"--config.{field}.base_url=http://127.0.0.1:8080 --config.{field}.model=NAME "
                "(see configs/flux.py)"]
    problems = []
    base_url = options.get("base_url")
    if not (isinstance(base_url, str) and base_url.startswith(("http://", "https://"))):
        problems.append(f"config.{field}.base_url={base_url!r}: must be the judge server's root URL, "
                        "e.g. http://127.0.0.1:8080")
    if not (isinstance(options.get("model"), str) and options.get("model")):
        problems.append(f"config.{field}.model={options.get('model')!r}: must name the model the judge "
                        "server serves")
    from prefgrpo_jax.rewards.judge import is_env_var_name

    key_env = options.get("api_key_env")
    if key_env and not is_env_var_name(key_env):
        problems.append(f"config.{field}.api_key_env=<{len(str(key_env))} characters, not shown>: must "
                        "be the NAME of an environment variable holding the key (letters, digits, _), "
                        "never the key itself; empty for no key")
    return problems


def _check_guards(config: ml_collections.ConfigDict, check) -> None:
    """The run's stop policies."""
    t = config.train
    for name in ("max_consecutive_nonfinite", "max_steps_without_signal"):
        value = t.get(name)
        check(f"train.{name}", isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              "must be an integer >= 0" + (" (0 = never stop)" if name == "max_steps_without_signal" else ""))


def base_config() -> ml_collections.ConfigDict:
    """Every field with the Pref-GRPO FLUX.1-dev recipe's value (MISSION.md).

    configs/flux.py uses it as is (plus the weights path); configs/tiny.py
    shrinks it. The README documents each field.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 320
    c.checkpoint_every = 10
    c.keep_checkpoints = 3
    c.log_every = 1
    c.image_every = 20
    # Resume with experiment fields (train.*, optim.*, reward.*, model, data) that
    # differ from the checkpoint's config: refused unless True (then each is logged).
    c.allow_config_change = False

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local diffusers-format FLUX directory
    c.model.dtype = "bfloat16"  # frozen parts (VAE, text encoders); trained params stay fp32
    c.model.remat = True
    c.model.remat_policy = "nothing_saveable"  # what remat keeps: see models/flux.py REMAT_POLICIES

    c.data = ml_collections.ConfigDict()
    c.data.prompts = ""  # .txt (one per line) or .jsonl ({"prompt": ..., "category": ...})

    c.train = ml_collections.ConfigDict()
    c.train.prompts_per_step = 8  # global, over all processes
    c.train.group_size = 8
    c.train.num_steps = 25
    c.train.eta = 0.7
    c.train.step_mode = "flow"
    c.train.schedule = "sd3"
    c.train.shift = 3.0
    c.train.quantize_timesteps = False
    c.train.init_same_noise = True
    c.train.guidance_scale = 3.5
    c.train.height = 720
    c.train.width = 720
    c.train.max_sequence_length = 512
    c.train.timestep_fraction = 0.6
    c.train.clip_range = 1e-4
    c.train.adv_clip_max = 5.0
    c.train.adv_ddof = 1
    c.train.kl_beta = 0.0
    c.train.grad_accum = 4
    c.train.timestep_chunk = 1
    c.train.max_consecutive_nonfinite = 5
    # Stop when a weighted reward source gives flat advantages (every image of
    # every group rewarded alike) this many steps in a row; 0 = never.
    c.train.max_steps_without_signal = 10

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5
    c.optim.weight_decay = 1e-4
    c.optim.max_grad_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.reward = ml_collections.ConfigDict()
    c.reward.spec = {"vlm_judge": 1.0}
    c.reward.options = ml_collections.ConfigDict()
    # Source logged as reward_mean ("" = the highest-weighted). A pure win rate
    # always averages 0.5, so pair it with a weight-0 score source to monitor.
    c.reward.monitor = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.fsdp_min_size = 2**14
    # [(regex over parameter paths, per-dimension mesh axes)], first match wins;
    # e.g. [("single_blocks/linear1/kernel", (None, "fsdp", "tensor"))].
    c.sharding.rules = []

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.cpu_collectives = False

    c.eval = ml_collections.ConfigDict()
    c.eval.judge = "toy_verifier"  # or "vlm_judge" (UniGenBench-style testpoints, eval.prompts)
    c.eval.prompts_per_dimension = 20  # toy_verifier
    c.eval.prompts = ""  # vlm_judge: JSONL of {"prompt", "dimension", "testpoints"}
    c.eval.vlm_judge = ml_collections.ConfigDict({
        "base_url": "http://127.0.0.1:8080", "model": "", "api_key_env": "",  # "" = no key
        "max_concurrency": 8, "timeout_s": 120.0, "retries": 3, "max_tokens": 2048,
    })
    c.eval.images_per_prompt = 1
    c.eval.num_steps = 20
    c.eval.batch_size = 20
    c.eval.seed = 1234

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ["a photo of a cat holding a sign that says hello world"]
    c.sample.images_per_prompt = 4
    c.sample.num_steps = 28
    return c
