"""Config validation, run once before anything is compiled or loaded.

Every problem is one line naming the field, the bad value and what is allowed;
all problems are reported together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

from prefgrpo_jax import sampling, sharding
from prefgrpo_jax.models.flux import ATTENTION_IMPLS, DOUBLE_LORA_TARGETS, REMAT_POLICIES

MODES = ("train", "sample", "eval", "plan")
PLAN_PRESETS = ("", "flux1-dev")
DTYPES = ("float32", "bfloat16")
EVAL_JUDGES = ("toy_verifier", "vlm_judge", "unigenbench")


class ConfigError(ValueError):
    """The config cannot run; the message lists every bad field."""


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


# Sections whose keys the user chooses (reward sources): not fields of their own.
OPEN_SECTIONS = ("reward.spec", "reward.options")


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted paths of every field (leaf) of ``config``; open sections count as one."""
    paths = []
    for name in config.keys():
        path = f"{prefix}{name}"
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict) and path not in OPEN_SECTIONS:
            paths.extend(field_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


def resolve_batch(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """A copy with the batch layout derived for ``num_devices``.

    ``train.prompts_per_device > 0`` sets ``prompts_per_step`` to that many per
    data-parallel device (the reference's per-rank batch: the rollout grows
    with the pod); ``train.micro_batches = 0`` means one sample per device per
    micro-batch (the reference's gradient accumulation of single samples).
    A config that cannot be laid out is left for ``validate`` to report.
    """
    resolved = ml_collections.ConfigDict(config.to_dict())
    t = resolved.train
    try:
        data, fsdp, _ = sharding.mesh_shape(dict(resolved.mesh), num_devices)
    except ValueError:
        return resolved
    parallel = data * fsdp
    per_device, updates = t.get("prompts_per_device"), t.get("updates_per_rollout")
    if isinstance(per_device, int) and per_device > 0:
        t.prompts_per_step = per_device * parallel
    if t.micro_batches == 0 and isinstance(updates, int) and updates >= 1:
        per_update = t.prompts_per_step * t.group_size // updates
        if per_update % parallel == 0:
            t.micro_batches = per_update // parallel
    return resolved


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

    # Every field base_config() defines must be present: a default lives there
    # and nowhere else (no reader falls back on a copy of it).
    required = field_paths(base_config())
    if "grad_accum" in config.get("train", {}):
        raise ConfigError(
            "config.train.grad_accum was renamed: set config.train.micro_batches (micro-batches of "
            "one optimizer update) and config.train.updates_per_rollout (optimizer steps per "
            "rollout; the reference's gradient_accumulation_steps 4 with 8 images per rank is "
            "updates_per_rollout=2)"
        )
    missing = []
    for field in required:
        try:
            _get(config, field)
        except (KeyError, AttributeError):
            missing.append(field)
    if missing:
        raise ConfigError(
            "config is missing fields: " + ", ".join(f"config.{f}" for f in missing)
            + " (build configs from prefgrpo_jax.config.base_config(), as configs/tiny.py and "
            "configs/flux.py do: a config written for an older version lacks the fields added since)"
        )
    if mode not in MODES:
        problems.append(f"--mode={mode!r}: must be one of {MODES}")

    t = config.train
    check("seed", isinstance(config.seed, int) and config.seed >= 0, "must be an integer >= 0")
    check("total_steps", isinstance(config.total_steps, int) and config.total_steps >= 1, "must be an integer >= 1")
    check("checkpoint_every", isinstance(config.checkpoint_every, int) and config.checkpoint_every >= 1, "must be an integer >= 1 (steps)")
    check("keep_checkpoints", config.keep_checkpoints >= 1, "must be >= 1")
    check("export.dtype", config.export.dtype in DTYPES,
          f"must be one of {DTYPES}")
    check("export.lora_merged", isinstance(config.export.lora_merged, bool),
          "must be True (also write the merged transformer) or False (adapters only)")
    check("params_checkpoint_every", isinstance(config.params_checkpoint_every, int)
          and config.params_checkpoint_every >= 0, "must be an integer >= 0 (steps; 0 = off)")
    check("log_every", config.log_every >= 1, "must be >= 1")
    check("image_every", config.image_every >= 0, "must be >= 0 (0 = never)")
    check("model.dtype", config.model.dtype in DTYPES, f"must be one of {DTYPES}")
    check("model.compute_dtype", config.model.compute_dtype in DTYPES, f"must be one of {DTYPES}")
    check("model.remat_policy", config.model.remat_policy in REMAT_POLICIES,
          f"must be one of {REMAT_POLICIES}")
    check("model.attention", config.model.attention in ATTENTION_IMPLS,
          f"must be one of {ATTENTION_IMPLS}")
    check("model.attention_chunk", int(config.model.attention_chunk) >= 1,
          "must be >= 1 (queries per chunk of attention='chunked', e.g. 512)")
    from prefgrpo_jax import lora  # imports config's own dependencies only

    problems.extend(lora.config_problems(config))
    path = Path(str(config.model.path)) if config.model.path else None
    plan = config.plan
    if not (mode == "plan" and plan.preset):
        check("model.path", path is not None and (path / "model_index.json").is_file(),
              "must be a local diffusers-format FLUX directory containing model_index.json "
              "(set --config.model.path=/path/to/FLUX.1-dev, or --config.plan.preset=flux1-dev "
              "with --mode=plan)")
    if mode == "plan":
        check("plan.preset", plan.preset in PLAN_PRESETS, f"must be one of {PLAN_PRESETS} ('' = model.path's config.json files)")
        check("plan.devices", isinstance(plan.devices, int) and plan.devices >= 1, "must be an integer >= 1 (simulated devices)")
        check("plan.device_memory_gib", plan.device_memory_gib > 0, "must be > 0 (memory of one device, GiB)")
        check("plan.usable_fraction", 0 < plan.usable_fraction <= 1,
              "must be in (0, 1]: the share of device memory the program may use")
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
    check("train.micro_batches", isinstance(t.micro_batches, int) and t.micro_batches >= 0,
          "must be an integer >= 1, or 0 for one sample per device per micro-batch")
    check("train.prompts_per_device", isinstance(t.prompts_per_device, int)
          and t.prompts_per_device >= 0,
          "must be an integer >= 0 (0: prompts_per_step is the global count)")
    _check_update_fields(config, check)
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
    check("optim.mu_dtype", config.optim.mu_dtype in DTYPES,
          f"must be one of {DTYPES} (the dtype of Adam's first moment)")
    check("optim.max_grad_norm", config.optim.max_grad_norm is None or config.optim.max_grad_norm > 0, "must be > 0 or None")
    _check_guards(config, check)

    from prefgrpo_jax.rewards import registry

    spec = config.reward.spec.to_dict() if hasattr(config.reward.spec, "to_dict") else dict(config.reward.spec)
    known = registry.known_rewards()
    unknown = sorted(k for k in spec if k not in known)
    check("reward.spec", bool(spec) and not unknown,
          f"must map known reward backends to weights; unknown {unknown}, known: {known}")
    monitor = config.reward.monitor
    check("reward.monitor", not monitor or monitor in spec,
          f"must be empty or one of the sources in reward.spec {sorted(spec)}")
    options = config.reward.options
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    check("reward.options", not set(options) - set(spec),
          f"names sources {sorted(set(options) - set(spec))} that reward.spec {sorted(spec)} does not use")
    for name in sorted(set(spec) & set(known)):
        problems.extend(registry.option_problems(name, options.get(name, {})))
    if "vlm_judge" in spec:
        problems.extend(judge_option_problems(config.reward.options.get("vlm_judge"),
                                              "reward.options.vlm_judge"))

    every = config.eval.every
    check("eval.every", isinstance(every, int) and every >= 0,
          "must be an integer >= 0 (train steps between evals on a fixed subset; 0 = never)")
    if mode == "eval" or (mode == "train" and isinstance(every, int) and every > 0):
        e = config.eval
        check("eval.judge", e.judge in EVAL_JUDGES, f"must be one of {EVAL_JUDGES}")
        for field in ("images_per_prompt", "num_steps", "batch_size", "every_prompts"):
            check(f"eval.{field}", isinstance(e[field], int) and e[field] >= 1, "must be an integer >= 1")
        if e.judge in ("vlm_judge", "unigenbench"):
            problems.extend(judge_option_problems(e.vlm_judge, "eval.vlm_judge"))
        if e.judge == "unigenbench":
            _check_unigenbench(config, check)
        elif e.judge == "vlm_judge":
            check("eval.prompts", bool(e.prompts) and Path(str(e.prompts)).is_file(),
                  "must be an existing JSONL file of {\"prompt\", \"dimension\", \"testpoints\"} "
                  "objects (see prefgrpo_jax/evaluate.py)")
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
            updates = t.updates_per_rollout
            per_update = t.prompts_per_step * t.group_size // updates
            if per_update % parallel:
                need = parallel * updates // math.gcd(parallel * updates, t.group_size)
                problems.append(
                    f"config.train.prompts_per_step={t.prompts_per_step}: x group_size {t.group_size} / "
                    f"updates_per_rollout {updates} = {per_update} samples per update, not divisible by the "
                    f"{parallel} data-parallel devices (mesh.data x mesh.fsdp); use a multiple of {need}, "
                    "or train.prompts_per_device=1 (the reference's one prompt per device)")
            else:
                per_device = per_update // parallel
                valid = [m for m in range(1, per_device + 1) if per_device % m == 0]
                check("train.micro_batches", t.micro_batches == 0 or t.micro_batches in valid,
                      f"must divide the {per_device} samples each of the {parallel} devices trains per "
                      f"update; valid here: {valid} (0 = {per_device}, one sample per device per micro-batch)")
    if problems:
        raise ConfigError(f"{len(problems)} invalid config field(s):\n  " + "\n  ".join(problems))


def _check_unigenbench(config: ml_collections.ConfigDict, check) -> None:
    """``eval.judge="unigenbench"``: the clone's files and the generation protocol."""
    from prefgrpo_jax import unigenbench

    e = config.eval
    check("eval.unigenbench_set", e.unigenbench_set in unigenbench.SETS, f"must be one of {unigenbench.SETS}")
    root = Path(str(e.unigenbench_dir)) if e.unigenbench_dir else None
    if e.unigenbench_set in unigenbench.SETS:
        csv_path = unigenbench.prompts_csv(root, e.unigenbench_set) if root else None
        check("eval.unigenbench_dir", root is not None and csv_path.is_file()
              and (root / unigenbench.COMMON_FILE).is_file(),
              f"must be a clone of https://github.com/CodeGoat24/UniGenBench holding "
              f"data/test_prompts_{e.unigenbench_set}.csv and {unigenbench.COMMON_FILE} "
              "(set --config.eval.unigenbench_dir=/path/to/UniGenBench)")
    u = e.unigenbench
    for field in ("images_per_prompt", "num_steps", "max_sequence_length"):
        check(f"eval.unigenbench.{field}", isinstance(u[field], int) and u[field] >= 1, "must be an integer >= 1")
    for field in ("seed", "max_retries", "limit"):
        check(f"eval.unigenbench.{field}", isinstance(u[field], int) and u[field] >= 0, "must be an integer >= 0")
    for side in ("height", "width"):
        check(f"eval.unigenbench.{side}", isinstance(u[side], int) and u[side] > 0 and u[side] % 16 == 0,
              "must be a positive multiple of 16 (1024 in the official protocol)")


def _check_update_fields(config: ml_collections.ConfigDict, check) -> None:
    """The fields of what one rollout trains and how (see README's config table)."""
    from prefgrpo_jax import grpo
    from prefgrpo_jax.rewards.advantages import ADV_NORMS

    t, o = config.train, config.optim
    u = t.updates_per_rollout
    group_ok = isinstance(t.group_size, int) and t.group_size >= 2  # else reported on its own
    check("train.updates_per_rollout", isinstance(u, int) and u >= 1 and (not group_ok or t.group_size % u == 0),
          f"must be an integer >= 1 dividing train.group_size={t.group_size} (each update takes a "
          "slice of every group; the reference's recipe is 2)")
    check("train.reward_image", t.reward_image in sampling.REWARD_IMAGES,
          f"must be one of {sampling.REWARD_IMAGES} (x0_pred: the reference)")
    check("train.adv_norm", t.adv_norm in ADV_NORMS, f"must be one of {ADV_NORMS}")
    check("train.kl_form", t.kl_form in grpo.KL_FORMS, f"must be one of {grpo.KL_FORMS}")
    check("train.rationorm", isinstance(t.rationorm, bool), "must be True or False")
    check("train.overlap", isinstance(t.overlap, bool),
          "must be True or False (True: judge each group as it is decoded and train while judging)")
    check("reward.gdpo", isinstance(config.reward.gdpo, bool), "must be True or False")
    cfg_scale = t.cfg_scale
    check("train.cfg_scale", isinstance(cfg_scale, (int, float)) and cfg_scale >= 1.0,
          "must be >= 1.0 (1.0: no classifier-free guidance; the unconditional branch uses the empty prompt)")
    window = t.sde_window
    lo, hi = t.sde_window_range
    last = t.num_steps - 1 if isinstance(t.num_steps, int) else 0
    check("train.sde_window", isinstance(window, int) and 0 <= window <= last,
          f"must be 0 (every step stochastic) or the size of the SDE window, at most num_steps - 1 = {last}")
    check("train.sde_window_range", not window or (0 <= lo and hi <= last and hi - lo >= window),
          f"must be (lo, hi) with 0 <= lo, hi <= num_steps - 1 = {last} and hi - lo >= sde_window: "
          "the window lies within steps [lo, hi)")
    check("train.rationorm", not (t.rationorm and t.step_mode == "cps"),
          "cannot be combined with train.step_mode='cps' (its log-probs drop the 1/(2 std^2) scale "
          "that GRPO-Guard's ratio assumes); use step_mode='flow'")
    check("optim.schedule", o.schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}")
    warmup = o.warmup_steps
    check("optim.warmup_steps", isinstance(warmup, int) and warmup >= 0,
          "must be an integer >= 0 (optimizer updates of linear warmup from 0)")
    ema = config.ema
    check("ema.decay", 0.0 <= ema.decay < 1.0, "must be in [0, 1) (0: no EMA; the reference's is 0.99)")
    check("ema.every", isinstance(ema.every, int) and ema.every >= 1,
          "must be an integer >= 1 (optimizer updates between EMA updates)")
    check("ema.use", not ema.use or ema.decay > 0,
          "True needs ema.decay > 0 (the run must keep an EMA to sample, evaluate or export it)")


LR_SCHEDULES = ("constant", "cosine")


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
        value = t[name]
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
    c.checkpoint_every = 10  # full train state (params + optimizer): exact resume
    # Params-only checkpoints (what sample/eval/export need; a third of the
    # bytes) every this many steps in workdir/params_checkpoints; 0 = off.
    c.params_checkpoint_every = 0
    c.keep_checkpoints = 3
    c.log_every = 1
    c.image_every = 20
    # Resume with experiment fields (train.*, optim.*, reward.*, model, data) that
    # differ from the checkpoint's config: refused unless True (then each is logged).
    c.allow_config_change = False

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local diffusers-format FLUX directory
    c.model.dtype = "bfloat16"  # frozen parts (VAE, text encoders); trained params stay fp32
    # The transformer's activations: bf16 = the reference's autocast on fp32
    # master weights (params cast inside jit, gathers move bf16); the SDE step,
    # log-probs, ratios and advantages are fp32 whatever this says.
    c.model.compute_dtype = "float32"
    c.model.remat = True
    c.model.remat_policy = "nothing_saveable"  # what remat keeps: see models/flux.py REMAT_POLICIES
    # Transformer attention (models/flux.py ATTENTION_IMPLS): auto = cuDNN flash
    # on GPU, Pallas splash on TPU, einsum on CPU; chunked bounds memory on CPU.
    c.model.attention = "auto"
    c.model.attention_chunk = 512  # queries per chunk of attention="chunked"
    # LoRA (prefgrpo_jax/lora.py): rank 0 = full fine-tuning. With rank > 0 only
    # peft-style adapters on the diffusers modules in targets (peft's suffix
    # match) are trained and checkpointed; the base stays frozen in model.dtype.
    # The reference's recipe: rank 64, alpha 128 (configs/flux_lora.py).
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 128.0  # delta scale alpha / rank, as peft's lora_alpha
    c.model.lora.targets = tuple(DOUBLE_LORA_TARGETS)  # the reference's lora_target_modules (a tuple: CLI-settable)
    c.model.lora.init = "default"  # peft's init_lora_weights: "default" (=True) or "gaussian"; B = 0

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
    c.train.kl_form = "prefgrpo"  # or "flowgrpo" (|dt| times smaller; Flow-GRPO's kl_beta values)
    # Optimizer steps per rollout, each on a slice of every group: the reference's
    # 8 images per rank with gradient_accumulation_steps 4 is 2. Steps after the
    # first are off-policy: the only place the ratio clip acts.
    c.train.updates_per_rollout = 2
    c.train.micro_batches = 4  # micro-batches of one update: memory only, same update (0: 1 sample/device each)
    # > 0: prompts_per_step = this x the data-parallel devices (the reference's
    # per-rank batch, so the rollout grows with the pod); 0: prompts_per_step.
    c.train.prompts_per_device = 0
    c.train.timestep_chunk = 1
    # Flow-GRPO-Fast: SDE (and training) only on a window of this many steps,
    # placed uniformly within steps [lo, hi) each rollout; ODE elsewhere. 0: off.
    c.train.sde_window = 0
    c.train.sde_window_range = (0, 24)
    c.train.rationorm = True  # GRPO-Guard ratio and |dt|-normalised loss (Pref-GRPO HEAD --rationorm)
    c.train.adv_norm = "group"  # or "group_global_std" (Flow-GRPO), "batch" (no groups)
    # Decoded for the reward: the last step's x0-prediction (the reference) or the
    # last SDE sample (still noisy).
    c.train.reward_image = "x0_pred"
    c.train.cfg_scale = 1.0  # > 1: classifier-free guidance with the empty prompt
    # Overlapped step (prefgrpo_jax/overlap.py): groups go to the judge as they are
    # decoded, micro-batches train as their groups' advantages come in. One process.
    c.train.overlap = False
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
    # Adam's first moment: "bfloat16" halves its bytes (optax mu_dtype; the
    # second moment stays fp32: its squares underflow bf16's mantissa sooner).
    c.optim.mu_dtype = "float32"
    c.optim.schedule = "constant"  # or "cosine" (to 0 at total_steps x updates_per_rollout)
    c.optim.warmup_steps = 0  # linear warmup over this many optimizer updates

    # EMA of the trained params (off at decay 0; the reference's optional EMA uses
    # 0.99 every update); sample/eval/export use it with --config.ema.use=True.
    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.0
    c.ema.every = 1
    c.ema.use = False

    c.reward = ml_collections.ConfigDict()
    c.reward.spec = {"vlm_judge": 1.0}
    c.reward.options = ml_collections.ConfigDict()
    # Source logged as reward_mean ("" = the highest-weighted). A pure win rate
    # always averages 0.5, so pair it with a weight-0 score source to monitor.
    c.reward.monitor = ""
    # Renormalise the weighted advantage sum over the batch before the clip
    # (Pref-GRPO HEAD --apply_gdpo; its _common_finetune.sh ships it commented out).
    c.reward.gdpo = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.fsdp_min_size = 2**14
    # [(regex over parameter paths, per-dimension mesh axes)], first match wins;
    # e.g. [("single_blocks/linear1/kernel", (None, "fsdp", "tensor"))].
    c.sharding.rules = []
    # Activations: [(logical axis, mesh axes)]; the model pins its token
    # activations to ("batch", "length", "embed") and the sampler its latent.
    c.sharding.activation_rules = [(name, axes) for name, axes in sharding.DEFAULT_ACTIVATION_RULES]

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.cpu_collectives = False

    c.eval = ml_collections.ConfigDict()
    # "toy_verifier", "vlm_judge" (yes/no testpoints of eval.prompts) or "unigenbench" (the
    # benchmark's own prompts, judge template and scoring, read from eval.unigenbench_dir).
    c.eval.judge = "toy_verifier"
    c.eval.prompts_per_dimension = 20  # toy_verifier
    c.eval.prompts = ""  # vlm_judge: JSONL of {"prompt", "dimension", "testpoints"}
    c.eval.vlm_judge = ml_collections.ConfigDict({
        "base_url": "http://127.0.0.1:8080", "model": "", "api_key_env": "",  # "" = no key
        "max_concurrency": 8, "timeout_s": 120.0, "retries": 3, "max_tokens": 2048,
    })
    c.eval.unigenbench_dir = ""  # unigenbench: a clone of github.com/CodeGoat24/UniGenBench
    c.eval.unigenbench_set = "en"  # en | en_long | zh | zh_long (data/test_prompts_{set}.csv)
    # unigenbench --mode=eval: the official generation protocol by default. seed + j is
    # the noise seed of image j of every prompt; max_retries re-asks the judge after a
    # reply that does not parse; limit > 0 keeps the first `limit` prompts (smoke runs).
    c.eval.unigenbench = ml_collections.ConfigDict({
        "images_per_prompt": 4, "seed": 3407, "height": 1024, "width": 1024, "num_steps": 30,
        "guidance_scale": 3.5, "max_sequence_length": 512, "max_retries": 10, "limit": 0,
    })
    # train: every `every` steps (0 = never), score eval.every_prompts prompts of the eval
    # judge's set (evenly spaced, fixed), 1 image each at the training size with
    # eval.num_steps and eval.seed; logged as eval/<dimension> and eval/overall.
    c.eval.every = 0
    c.eval.every_prompts = 64
    c.eval.images_per_prompt = 1
    c.eval.num_steps = 20
    c.eval.batch_size = 20
    c.eval.seed = 1234

    # The trained transformer written at the end of a run (workdir/export).
    c.export = ml_collections.ConfigDict()
    c.export.dtype = "bfloat16"  # or "float32" (the master weights as trained)
    # LoRA runs export their adapters (export/lora, peft format); True also
    # writes the transformer with the adapters merged (export/transformer).
    c.export.lora_merged = False

    # --mode=plan: compile this config's programs for a topology (simulated CPU
    # devices) and report per-device memory, FLOPs and collectives.
    c.plan = ml_collections.ConfigDict()
    c.plan.preset = ""  # "flux1-dev": model shapes without weights; "" = model.path's config.json
    c.plan.devices = 8
    c.plan.device_memory_gib = 80.0
    # Of that, what the program may use: the rest is the runtime's (CUDA context,
    # cuDNN workspaces, allocator slack) and the decode/reward phase's. JAX on GPU
    # takes 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION raises it.
    c.plan.usable_fraction = 0.9

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ["a photo of a cat holding a sign that says hello world"]
    c.sample.images_per_prompt = 4
    c.sample.num_steps = 28
    return c
