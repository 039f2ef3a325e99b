"""The run's config: one typed, validated object per section.

A field is defined once, in its section's dataclass below: its type, its
default (the Pref-GRPO FLUX.1-dev recipe's value, MISSION.md) and a comment on
what it means; the README's config table documents each one. Config files
start from ``base_config()``, the ml_collections view of those defaults that
``--config.<field>=`` overrides edit. ``build()`` turns the edited ConfigDict
into a ``RunConfig`` once, at a mode's entry, with the batch layout derived for
the devices at hand, and reports every invalid field together (one line each:
the field, the bad value, what is allowed). Code past the entry reads the
typed object only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from prefgrpo_jax import sampling, sharding
from prefgrpo_jax.lora import INITS
from prefgrpo_jax.models.flux import ATTENTION_IMPLS, DOUBLE_LORA_TARGETS, REMAT_POLICIES, LoraSpec

MODES = ("train", "sample", "eval", "plan")
PLAN_PRESETS = ("", "flux1-dev")
DTYPES = ("float32", "bfloat16")
EVAL_JUDGES = ("toy_verifier", "vlm_judge", "unigenbench")
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """The config cannot run; the message lists every bad field."""


def _plain(value: Any) -> Any:
    """ConfigDicts (at any depth) as plain dicts; other values unchanged."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Checks:
    """Collects ``config.<path><name>=<value>: <allowed>`` lines of one section."""

    def __init__(self, section: Any, path: str):
        self.section, self.path, self.found = section, path, []

    def __call__(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            value = getattr(self.section, name)
            value = value.to_dict() if isinstance(value, Section) else value
            self.found.append(f"config.{self.path}{name}={value!r}: {allowed}")


@dataclasses.dataclass(frozen=True)
class Section:
    """A config section: typed fields, built from a mapping, checked by ``problems``."""

    # The modes whose runs read this section (its values are checked only there); None: all.
    checked_in: typing.ClassVar[tuple[str, ...] | None] = None

    @classmethod
    @functools.cache
    def subsections(cls) -> dict[str, type[Section]]:
        """Fields that are sections of their own, by name."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if isinstance(hints[f.name], type) and issubclass(hints[f.name], Section)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | ml_collections.ConfigDict, path: str = ""):
        """The section of ``raw`` (a ConfigDict or a mapping) with every field present and known.

        Raises ConfigError naming each missing and each unknown field. No value is
        checked here: ``problems`` does that.
        """
        missing: list[str] = []
        unknown: list[str] = []
        built = cls._build(raw, path, missing, unknown)
        if missing:
            # A default lives in its dataclass alone: a config without a field (e.g. one
            # written for an older version) is refused by name, never read with a fallback.
            raise ConfigError(
                "config is missing fields: " + ", ".join(f"config.{f}" for f in sorted(missing))
                + " (build configs from prefgrpo_jax.config.base_config(), as configs/tiny.py and "
                "configs/flux.py do: a config written for an older version lacks the fields added since)"
            )
        if unknown:
            raise ConfigError(
                "config has unknown fields: " + ", ".join(f"config.{f}" for f in sorted(unknown))
                + " (a typo, or a field of another version; every field is listed in the README's config table)")
        return built

    @classmethod
    def _build(cls, raw: Any, path: str, missing: list[str], unknown: list[str]) -> Section | None:
        raw = _plain(raw)
        if not isinstance(raw, Mapping):
            unknown.append(f"{path[:-1]} (a section, given {raw!r})")
            return None
        names = [f.name for f in dataclasses.fields(cls)]
        unknown.extend(path + k for k in raw if k not in names)
        kwargs = {}
        for name in names:
            if name not in raw:
                missing.append(path + name)
                continue
            sub = cls.subsections().get(name)
            kwargs[name] = sub._build(raw[name], f"{path}{name}.", missing, unknown) if sub else raw[name]
        return cls(**kwargs) if len(kwargs) == len(names) and None not in (
            kwargs[n] for n in cls.subsections()) else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def problems(self, path: str, mode: str) -> list[str]:
        """Invalid fields of this section for ``mode`` (its subsections check themselves)."""
        del path, mode
        return []

    def all_problems(self, path: str, mode: str) -> list[str]:
        if self.checked_in is not None and mode not in self.checked_in:
            return []
        found = self.problems(path, mode)
        for name in self.subsections():
            found += getattr(self, name).all_problems(f"{path}{name}.", mode)
        return found


def _int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    """LoRA (prefgrpo_jax/lora.py): rank 0 = full fine-tuning. With rank > 0 only
    peft-style adapters on the diffusers modules in ``targets`` (peft's suffix
    match) are trained and checkpointed; the base stays frozen in model.dtype.
    The reference's recipe: rank 64, alpha 128 (configs/flux_lora.py)."""

    rank: int = 0
    alpha: float = 128.0  # delta scale alpha / rank, as peft's lora_alpha
    targets: tuple = tuple(DOUBLE_LORA_TARGETS)  # the reference's lora_target_modules (a tuple: CLI-settable)
    init: str = "default"  # peft's init_lora_weights: "default" (=True) or "gaussian"; B = 0

    def spec(self) -> LoraSpec | None:
        """These fields as the model's ``LoraSpec``; None when LoRA is off (rank 0).

        Raises ValueError (naming the field) for a rank, alpha or target it cannot take.
        """
        if not int(self.rank):
            return None
        return LoraSpec(rank=int(self.rank), alpha=float(self.alpha), targets=tuple(self.targets))

    def problems(self, path: str, mode: str) -> list[str]:
        if not _int(self.rank, 0):
            return [f"config.{path}rank={self.rank!r}: must be an integer >= 0 (0 = LoRA off; the reference uses 64)"]
        if self.rank == 0:
            return []
        check = _Checks(self, path)
        check("init", self.init in INITS, f"must be one of {INITS}")
        try:
            self.spec()
        except (ValueError, TypeError) as e:
            check.found.append(f"config.{e}" if str(e).startswith("model.lora") else str(e))
        return check.found


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    path: str = ""  # local diffusers-format FLUX directory
    dtype: str = "bfloat16"  # frozen parts (VAE, text encoders); trained params stay fp32
    # The transformer's activations: bf16 = the reference's autocast on fp32
    # master weights (params cast inside jit, gathers move bf16); the SDE step,
    # log-probs, ratios and advantages are fp32 whatever this says.
    compute_dtype: str = "float32"
    remat: bool = True
    remat_policy: str = "nothing_saveable"  # what remat keeps: see models/flux.py REMAT_POLICIES
    # Transformer attention (models/flux.py ATTENTION_IMPLS): auto = cuDNN flash
    # on GPU, Pallas splash on TPU, einsum on CPU; chunked bounds memory on CPU.
    attention: str = "auto"
    attention_chunk: int = 512  # queries per chunk of attention="chunked"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("dtype", self.dtype in DTYPES, f"must be one of {DTYPES}")
        check("compute_dtype", self.compute_dtype in DTYPES, f"must be one of {DTYPES}")
        check("remat_policy", self.remat_policy in REMAT_POLICIES, f"must be one of {REMAT_POLICIES}")
        check("attention", self.attention in ATTENTION_IMPLS, f"must be one of {ATTENTION_IMPLS}")
        check("attention_chunk", _int(self.attention_chunk, 1),
              "must be >= 1 (queries per chunk of attention='chunked', e.g. 512)")
        return check.found


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    prompts: str = ""  # .txt (one per line) or .jsonl ({"prompt": ..., "category": ...})


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    prompts_per_step: int = 8  # global, over all processes
    group_size: int = 8
    num_steps: int = 25
    eta: float = 0.7
    step_mode: str = "flow"
    schedule: str = "sd3"
    shift: float = 3.0
    quantize_timesteps: bool = False
    init_same_noise: bool = True
    guidance_scale: float = 3.5
    height: int = 720
    width: int = 720
    max_sequence_length: int = 512
    timestep_fraction: float = 0.6
    clip_range: float = 1e-4
    adv_clip_max: float | None = 5.0
    adv_ddof: int = 1
    kl_beta: float = 0.0
    kl_form: str = "prefgrpo"  # or "flowgrpo" (|dt| times smaller; Flow-GRPO's kl_beta values)
    # Optimizer steps per rollout, each on a slice of every group: the reference's
    # 8 images per rank with gradient_accumulation_steps 4 is 2. Steps after the
    # first are off-policy: the only place the ratio clip acts.
    updates_per_rollout: int = 2
    micro_batches: int = 4  # micro-batches of one update: memory only, same update (0: 1 sample/device each)
    # > 0: prompts_per_step = this x the data-parallel devices (the reference's
    # per-rank batch, so the rollout grows with the pod); 0: prompts_per_step.
    prompts_per_device: int = 0
    timestep_chunk: int = 1
    # Flow-GRPO-Fast: SDE (and training) only on a window of this many steps,
    # placed uniformly within steps [lo, hi) each rollout; ODE elsewhere. 0: off.
    sde_window: int = 0
    sde_window_range: tuple = (0, 24)
    rationorm: bool = True  # GRPO-Guard ratio and |dt|-normalised loss (Pref-GRPO HEAD --rationorm)
    adv_norm: str = "group"  # or "group_global_std" (Flow-GRPO), "batch" (no groups)
    # Decoded for the reward: the last step's x0-prediction (the reference) or the
    # last SDE sample (still noisy).
    reward_image: str = "x0_pred"
    cfg_scale: float = 1.0  # > 1: classifier-free guidance with the empty prompt
    # Overlapped step (prefgrpo_jax/overlap.py): groups go to the judge as they are
    # decoded, micro-batches train as their groups' advantages come in. One process.
    overlap: bool = False
    max_consecutive_nonfinite: int = 5
    # Stop when a weighted reward source gives flat advantages (every image of
    # every group rewarded alike) this many steps in a row; 0 = never.
    max_steps_without_signal: int = 10

    def trained_timesteps(self) -> int:
        """Trained timesteps per sample: ``timestep_fraction x (num_steps - 1)``, at least 1."""
        return max(1, int(self.timestep_fraction * (self.num_steps - 1)))

    def problems(self, path: str, mode: str) -> list[str]:
        from prefgrpo_jax import grpo
        from prefgrpo_jax.rewards.advantages import ADV_NORMS

        check = _Checks(self, path)
        check("group_size", _int(self.group_size, 2),
              "must be an integer >= 2 (win rates compare images within a group)")
        check("prompts_per_step", _int(self.prompts_per_step, 1), "must be an integer >= 1")
        check("num_steps", _int(self.num_steps, 2), "must be an integer >= 2 (the last step is never trained)")
        check("eta", self.eta > 0, "must be > 0 (the SDE needs noise for log-probabilities)")
        check("step_mode", self.step_mode in sampling.STEP_MODES, f"must be one of {sampling.STEP_MODES}")
        check("schedule", self.schedule in sampling.SCHEDULES, f"must be one of {sampling.SCHEDULES}")
        check("timestep_fraction", 0 < self.timestep_fraction <= 1, "must be in (0, 1]")
        check("clip_range", self.clip_range > 0, "must be > 0 (PPO ratio clip eps; 1e-4 in the Pref-GRPO recipe)")
        check("adv_clip_max", self.adv_clip_max is None or self.adv_clip_max > 0, "must be > 0 or None")
        check("kl_beta", self.kl_beta >= 0, "must be >= 0")
        check("micro_batches", _int(self.micro_batches, 0),
              "must be an integer >= 1, or 0 for one sample per device per micro-batch")
        check("prompts_per_device", _int(self.prompts_per_device, 0),
              "must be an integer >= 0 (0: prompts_per_step is the global count)")
        u = self.updates_per_rollout
        group_ok = _int(self.group_size, 2)  # else reported on its own
        check("updates_per_rollout", _int(u, 1) and (not group_ok or self.group_size % u == 0),
              f"must be an integer >= 1 dividing train.group_size={self.group_size} (each update takes a "
              "slice of every group; the reference's recipe is 2)")
        check("reward_image", self.reward_image in sampling.REWARD_IMAGES,
              f"must be one of {sampling.REWARD_IMAGES} (x0_pred: the reference)")
        check("adv_norm", self.adv_norm in ADV_NORMS, f"must be one of {ADV_NORMS}")
        check("kl_form", self.kl_form in grpo.KL_FORMS, f"must be one of {grpo.KL_FORMS}")
        check("rationorm", isinstance(self.rationorm, bool), "must be True or False")
        check("overlap", isinstance(self.overlap, bool),
              "must be True or False (True: judge each group as it is decoded and train while judging)")
        check("cfg_scale", isinstance(self.cfg_scale, (int, float)) and self.cfg_scale >= 1.0,
              "must be >= 1.0 (1.0: no classifier-free guidance; the unconditional branch uses the empty prompt)")
        window, (lo, hi) = self.sde_window, self.sde_window_range
        last = self.num_steps - 1 if isinstance(self.num_steps, int) else 0
        check("sde_window", isinstance(window, int) and 0 <= window <= last,
              f"must be 0 (every step stochastic) or the size of the SDE window, at most num_steps - 1 = {last}")
        check("sde_window_range", not window or (0 <= lo and hi <= last and hi - lo >= window),
              f"must be (lo, hi) with 0 <= lo, hi <= num_steps - 1 = {last} and hi - lo >= sde_window: "
              "the window lies within steps [lo, hi)")
        check("rationorm", not (self.rationorm and self.step_mode == "cps"),
              "cannot be combined with train.step_mode='cps' (its log-probs drop the 1/(2 std^2) scale "
              "that GRPO-Guard's ratio assumes); use step_mode='flow'")
        check("timestep_chunk", _int(self.timestep_chunk, 1), "must be an integer >= 1")
        for side in ("height", "width"):
            value = getattr(self, side)
            check(side, _int(value, 1) and value % 16 == 0,
                  "must be a positive multiple of 16 (VAE factor 8 x 2x2 packing for FLUX; 16 is also safe for the toy VAE)")
        if _int(self.num_steps, 2) and 0 < self.timestep_fraction <= 1 and _int(self.timestep_chunk, 1):
            k = self.trained_timesteps()
            check("timestep_chunk", k % self.timestep_chunk == 0,
                  f"must divide the {k} trained timesteps per sample (timestep_fraction x (num_steps - 1))")
        for name in ("max_consecutive_nonfinite", "max_steps_without_signal"):
            check(name, _int(getattr(self, name), 0),
                  "must be an integer >= 0" + (" (0 = never stop)" if name == "max_steps_without_signal" else ""))
        return check.found


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Adam's first moment: "bfloat16" halves its bytes (optax mu_dtype; the
    # second moment stays fp32: its squares underflow bf16's mantissa sooner).
    mu_dtype: str = "float32"
    schedule: str = "constant"  # or "cosine" (to 0 at total_steps x updates_per_rollout)
    warmup_steps: int = 0  # linear warmup over this many optimizer updates

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("learning_rate", self.learning_rate > 0, "must be > 0")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("mu_dtype", self.mu_dtype in DTYPES, f"must be one of {DTYPES} (the dtype of Adam's first moment)")
        check("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "must be > 0 or None")
        check("schedule", self.schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}")
        check("warmup_steps", _int(self.warmup_steps, 0),
              "must be an integer >= 0 (optimizer updates of linear warmup from 0)")
        return check.found


@dataclasses.dataclass(frozen=True)
class EmaConfig(Section):
    """EMA of the trained params (off at decay 0; the reference's optional EMA
    uses 0.99 every update); sample/eval/export use it with ema.use=True."""

    decay: float = 0.0
    every: int = 1
    use: bool = False

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("decay", 0.0 <= self.decay < 1.0, "must be in [0, 1) (0: no EMA; the reference's is 0.99)")
        check("every", _int(self.every, 1), "must be an integer >= 1 (optimizer updates between EMA updates)")
        check("use", not self.use or self.decay > 0,
              "True needs ema.decay > 0 (the run must keep an EMA to sample, evaluate or export it)")
        return check.found


@dataclasses.dataclass(frozen=True)
class RewardConfig(Section):
    # Reward sources and their weights; the keys are names of registered rewards.
    spec: dict = dataclasses.field(default_factory=lambda: {"vlm_judge": 1.0})
    options: dict = dataclasses.field(default_factory=dict)  # per source: its factory's keyword options
    # Source logged as reward_mean ("" = the highest-weighted). A pure win rate
    # always averages 0.5, so pair it with a weight-0 score source to monitor.
    monitor: str = ""
    # Renormalise the weighted advantage sum over the batch before the clip
    # (Pref-GRPO HEAD --apply_gdpo; its _common_finetune.sh ships it commented out).
    gdpo: bool = False

    def problems(self, path: str, mode: str) -> list[str]:
        from prefgrpo_jax.rewards import registry

        check = _Checks(self, path)
        spec, options = dict(self.spec or {}), dict(self.options or {})
        known = registry.known_rewards()
        unknown = sorted(k for k in spec if k not in known)
        check("spec", bool(spec) and not unknown,
              f"must map known reward backends to weights; unknown {unknown}, known: {known}")
        check("monitor", not self.monitor or self.monitor in spec,
              f"must be empty or one of the sources in reward.spec {sorted(spec)}")
        check("options", not set(options) - set(spec),
              f"names sources {sorted(set(options) - set(spec))} that reward.spec {sorted(spec)} does not use")
        check("gdpo", isinstance(self.gdpo, bool), "must be True or False")
        for name in sorted(set(spec) & set(known)):
            check.found.extend(registry.option_problems(name, options.get(name, {})))
        if "vlm_judge" in spec:
            check.found.extend(judge_option_problems(options.get("vlm_judge"), f"{path}options.vlm_judge"))
        return check.found


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def sizes(self) -> dict[str, int]:
        """``{"data", "fsdp", "tensor"}`` sizes as given (one may be -1)."""
        return {axis: getattr(self, axis) for axis in sharding.MESH_AXES}

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        for axis in sharding.MESH_AXES:
            size = getattr(self, axis)
            check(axis, isinstance(size, int) and (size >= 1 or size == -1),
                  "must be a positive integer or -1 (all remaining devices)")
        return check.found


@dataclasses.dataclass(frozen=True)
class ShardingConfig(Section):
    fsdp_min_size: int = 2**14
    # [(regex over parameter paths, per-dimension mesh axes)], first match wins;
    # e.g. [("single_blocks/linear1/kernel", (None, "fsdp", "tensor"))].
    rules: list = dataclasses.field(default_factory=list)
    # Activations: [(logical axis, mesh axes)]; the model pins its token
    # activations to ("batch", "length", "embed") and the sampler its latent.
    activation_rules: list = dataclasses.field(
        default_factory=lambda: [(name, axes) for name, axes in sharding.DEFAULT_ACTIVATION_RULES])


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Section):
    enabled: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    cpu_collectives: bool = False


@dataclasses.dataclass(frozen=True)
class UnigenbenchProtocol(Section):
    """unigenbench --mode=eval: the official generation protocol by default.
    seed + j is the noise seed of image j of every prompt; max_retries re-asks the
    judge after a reply that does not parse; limit > 0 keeps the first ``limit``
    prompts (smoke runs)."""

    images_per_prompt: int = 4
    seed: int = 3407
    height: int = 1024
    width: int = 1024
    num_steps: int = 30
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    max_retries: int = 10
    limit: int = 0

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        for name in ("images_per_prompt", "num_steps", "max_sequence_length"):
            check(name, _int(getattr(self, name), 1), "must be an integer >= 1")
        for name in ("seed", "max_retries", "limit"):
            check(name, _int(getattr(self, name), 0), "must be an integer >= 0")
        for side in ("height", "width"):
            value = getattr(self, side)
            check(side, _int(value, 1) and value % 16 == 0,
                  "must be a positive multiple of 16 (1024 in the official protocol)")
        return check.found


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    # "toy_verifier", "vlm_judge" (yes/no testpoints of eval.prompts) or "unigenbench" (the
    # benchmark's own prompts, judge template and scoring, read from eval.unigenbench_dir).
    judge: str = "toy_verifier"
    prompts_per_dimension: int = 20  # toy_verifier
    prompts: str = ""  # vlm_judge: JSONL of {"prompt", "dimension", "testpoints"}
    vlm_judge: dict = dataclasses.field(default_factory=lambda: {
        "base_url": "http://127.0.0.1:8080", "model": "", "api_key_env": "",  # "" = no key
        "max_concurrency": 8, "timeout_s": 120.0, "retries": 3, "max_tokens": 2048,
    })
    unigenbench_dir: str = ""  # unigenbench: a clone of github.com/CodeGoat24/UniGenBench
    unigenbench_set: str = "en"  # en | en_long | zh | zh_long (data/test_prompts_{set}.csv)
    unigenbench: UnigenbenchProtocol = dataclasses.field(default_factory=UnigenbenchProtocol)
    # train: every ``every`` steps (0 = never), score eval.every_prompts prompts of the eval
    # judge's set (evenly spaced, fixed), 1 image each at the training size with
    # eval.num_steps and eval.seed; logged as eval/<dimension> and eval/overall.
    every: int = 0
    every_prompts: int = 64
    images_per_prompt: int = 1
    num_steps: int = 20
    batch_size: int = 20
    seed: int = 1234

    def judged(self, mode: str) -> bool:
        """Whether ``mode`` runs the eval judge (eval mode, or training with periodic evals)."""
        return mode == "eval" or (mode == "train" and _int(self.every, 1))

    def all_problems(self, path: str, mode: str) -> list[str]:
        # The protocol is checked only where the unigenbench judge runs.
        found = self.problems(path, mode)
        if self.judged(mode) and self.judge == "unigenbench":
            found += self.unigenbench.all_problems(f"{path}unigenbench.", mode)
        return found

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("every", _int(self.every, 0),
              "must be an integer >= 0 (train steps between evals on a fixed subset; 0 = never)")
        if not self.judged(mode):
            return check.found
        check("judge", self.judge in EVAL_JUDGES, f"must be one of {EVAL_JUDGES}")
        for name in ("images_per_prompt", "num_steps", "batch_size", "every_prompts"):
            check(name, _int(getattr(self, name), 1), "must be an integer >= 1")
        if self.judge in ("vlm_judge", "unigenbench"):
            check.found.extend(judge_option_problems(self.vlm_judge, f"{path}vlm_judge"))
        if self.judge == "unigenbench":
            from prefgrpo_jax import unigenbench

            check("unigenbench_set", self.unigenbench_set in unigenbench.SETS, f"must be one of {unigenbench.SETS}")
            root = Path(str(self.unigenbench_dir)) if self.unigenbench_dir else None
            if self.unigenbench_set in unigenbench.SETS:
                csv_path = unigenbench.prompts_csv(root, self.unigenbench_set) if root else None
                check("unigenbench_dir", root is not None and csv_path.is_file()
                      and (root / unigenbench.COMMON_FILE).is_file(),
                      f"must be a clone of https://github.com/CodeGoat24/UniGenBench holding "
                      f"data/test_prompts_{self.unigenbench_set}.csv and {unigenbench.COMMON_FILE} "
                      "(set --config.eval.unigenbench_dir=/path/to/UniGenBench)")
        elif self.judge == "vlm_judge":
            check("prompts", bool(self.prompts) and Path(str(self.prompts)).is_file(),
                  "must be an existing JSONL file of {\"prompt\", \"dimension\", \"testpoints\"} "
                  "objects (see prefgrpo_jax/evaluate.py)")
        elif self.judge == "toy_verifier":
            check("prompts_per_dimension", _int(self.prompts_per_dimension, 1), "must be an integer >= 1")
        return check.found


@dataclasses.dataclass(frozen=True)
class ExportConfig(Section):
    """The trained transformer written at the end of a run (workdir/export)."""

    dtype: str = "bfloat16"  # or "float32" (the master weights as trained)
    # LoRA runs export their adapters (export/lora, peft format); True also
    # writes the transformer with the adapters merged (export/transformer).
    lora_merged: bool = False

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("dtype", self.dtype in DTYPES, f"must be one of {DTYPES}")
        check("lora_merged", isinstance(self.lora_merged, bool),
              "must be True (also write the merged transformer) or False (adapters only)")
        return check.found


@dataclasses.dataclass(frozen=True)
class PlanConfig(Section):
    """--mode=plan: compile this config's programs for a topology (simulated CPU
    devices) and report per-device memory, FLOPs and collectives."""

    preset: str = ""  # "flux1-dev": model shapes without weights; "" = model.path's config.json
    devices: int = 8
    device_memory_gib: float = 80.0
    # Of that, what the program may use: the rest is the runtime's (CUDA context,
    # cuDNN workspaces, allocator slack) and the decode/reward phase's. JAX on GPU
    # takes 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION raises it.
    usable_fraction: float = 0.9
    checked_in = ("plan",)

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("preset", self.preset in PLAN_PRESETS, f"must be one of {PLAN_PRESETS} ('' = model.path's config.json files)")
        check("devices", _int(self.devices, 1), "must be an integer >= 1 (simulated devices)")
        check("device_memory_gib", self.device_memory_gib > 0, "must be > 0 (memory of one device, GiB)")
        check("usable_fraction", 0 < self.usable_fraction <= 1,
              "must be in (0, 1]: the share of device memory the program may use")
        return check.found


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    prompts: list = dataclasses.field(
        default_factory=lambda: ["a photo of a cat holding a sign that says hello world"])
    images_per_prompt: int = 4
    num_steps: int = 28
    checked_in = ("sample",)

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        check("prompts", len(self.prompts) > 0 and all(isinstance(p, str) and p for p in self.prompts),
              "must be a non-empty list of prompts")
        check("images_per_prompt", _int(self.images_per_prompt, 1), "must be an integer >= 1")
        check("num_steps", _int(self.num_steps, 1), "must be an integer >= 1")
        return check.found


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """The whole run: top-level fields, then one object per section."""

    seed: int = 0
    total_steps: int = 320
    checkpoint_every: int = 10  # full train state (params + optimizer): exact resume
    # Params-only checkpoints (what sample/eval/export need; a third of the
    # bytes) every this many steps in workdir/params_checkpoints; 0 = off.
    params_checkpoint_every: int = 0
    keep_checkpoints: int = 3
    log_every: int = 1
    image_every: int = 20
    # Resume with experiment fields (train.*, optim.*, reward.*, model, data) that
    # differ from the checkpoint's config: refused unless True (then each is logged).
    allow_config_change: bool = False
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def problems(self, path: str, mode: str) -> list[str]:
        check = _Checks(self, path)
        if mode not in MODES:
            check.found.append(f"--mode={mode!r}: must be one of {MODES}")
        check("seed", _int(self.seed, 0), "must be an integer >= 0")
        check("total_steps", _int(self.total_steps, 1), "must be an integer >= 1")
        check("checkpoint_every", _int(self.checkpoint_every, 1), "must be an integer >= 1 (steps)")
        check("keep_checkpoints", _int(self.keep_checkpoints, 1), "must be >= 1")
        check("params_checkpoint_every", _int(self.params_checkpoint_every, 0),
              "must be an integer >= 0 (steps; 0 = off)")
        check("log_every", _int(self.log_every, 1), "must be >= 1")
        check("image_every", _int(self.image_every, 0), "must be >= 0 (0 = never)")
        path_ok = bool(self.model.path) and (Path(str(self.model.path)) / "model_index.json").is_file()
        if not (mode == "plan" and self.plan.preset):
            check.found.extend([] if path_ok else [
                f"config.model.path={self.model.path!r}: must be a local diffusers-format FLUX directory "
                "containing model_index.json (set --config.model.path=/path/to/FLUX.1-dev, or "
                "--config.plan.preset=flux1-dev with --mode=plan)"])
        return check.found

    def layout_problems(self, num_devices: int) -> list[str]:
        """The batch layout on ``num_devices`` (for an otherwise valid config)."""
        t = self.train
        try:
            data, fsdp, _ = sharding.mesh_shape(self.mesh.sizes(), num_devices)
        except ValueError as err:
            return [str(err)]
        parallel = data * fsdp
        updates = t.updates_per_rollout
        per_update = t.prompts_per_step * t.group_size // updates
        if per_update % parallel:
            need = parallel * updates // math.gcd(parallel * updates, t.group_size)
            return [
                f"config.train.prompts_per_step={t.prompts_per_step}: x group_size {t.group_size} / "
                f"updates_per_rollout {updates} = {per_update} samples per update, not divisible by the "
                f"{parallel} data-parallel devices (mesh.data x mesh.fsdp); use a multiple of {need}, "
                "or train.prompts_per_device=1 (the reference's one prompt per device)"]
        per_device = per_update // parallel
        valid = [m for m in range(1, per_device + 1) if per_device % m == 0]
        if t.micro_batches == 0 or t.micro_batches in valid:
            return []
        return [f"config.train.micro_batches={t.micro_batches!r}: must divide the {per_device} samples each "
                f"of the {parallel} data-parallel devices trains per update; valid here: {valid} "
                f"(0 = {per_device}, one sample per device per micro-batch)"]

    def resolve_batch(self, num_devices: int) -> RunConfig:
        """A copy with the batch layout derived for ``num_devices``.

        ``train.prompts_per_device > 0`` sets ``prompts_per_step`` to that many per
        data-parallel device (the reference's per-rank batch: the rollout grows
        with the pod); ``train.micro_batches = 0`` means one sample per device per
        micro-batch (the reference's gradient accumulation of single samples).
        A config that cannot be laid out is left for ``layout_problems`` to report.
        """
        t = self.train
        try:
            data, fsdp, _ = sharding.mesh_shape(self.mesh.sizes(), num_devices)
        except ValueError:
            return self
        parallel = data * fsdp
        if _int(t.prompts_per_device, 1):
            t = t.replace(prompts_per_step=t.prompts_per_device * parallel)
        if t.micro_batches == 0 and _int(t.updates_per_rollout, 1):
            per_update = t.prompts_per_step * t.group_size // t.updates_per_rollout
            if per_update % parallel == 0:
                t = t.replace(micro_batches=per_update // parallel)
        return self.replace(train=t)


def build(config: ml_collections.ConfigDict | RunConfig, *, mode: str = "train",
          num_devices: int | None = None) -> RunConfig:
    """The typed, validated config of a run in ``mode`` on ``num_devices`` devices.

    Raises ConfigError listing every invalid field. With ``num_devices`` the batch
    layout is derived (``RunConfig.resolve_batch``) and checked for that many.
    """
    if isinstance(config, RunConfig):
        run = config
    else:
        raw = _plain(config)
        if "grad_accum" in raw.get("train", {}):
            raise ConfigError(
                "config.train.grad_accum was renamed: set config.train.micro_batches (micro-batches of "
                "one optimizer update) and config.train.updates_per_rollout (optimizer steps per "
                "rollout; the reference's gradient_accumulation_steps 4 with 8 images per rank is "
                "updates_per_rollout=2)"
            )
        run = RunConfig.from_dict(raw)
    if num_devices is not None:
        run = run.resolve_batch(num_devices)
    problems = run.all_problems("", mode)
    if num_devices is not None and not problems:
        problems = run.layout_problems(num_devices)
    if problems:
        raise ConfigError(f"{len(problems)} invalid config field(s):\n  " + "\n  ".join(problems))
    return run


def validate(config: ml_collections.ConfigDict | RunConfig, *, mode: str = "train",
             num_devices: int | None = None) -> None:
    """Raises ConfigError listing every invalid field (no-op for a valid config)."""
    build(config, mode=mode, num_devices=num_devices)


def field_paths(section: type[Section] = RunConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every field of ``section``; a mapping-valued field counts as one."""
    paths = []
    for f in dataclasses.fields(section):
        sub = section.subsections().get(f.name)
        paths += field_paths(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return paths


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


def base_config() -> ml_collections.ConfigDict:
    """Every field at its default (``RunConfig``), as the ConfigDict config files edit.

    configs/flux.py uses it as is (plus the weights path); configs/tiny.py
    shrinks it. The README documents each field.
    """
    return ml_collections.ConfigDict(RunConfig().to_dict())
