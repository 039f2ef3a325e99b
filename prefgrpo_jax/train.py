"""The Pref-GRPO training loop: the only place with side effects.

One step: prompts (this process's shard) -> text embeddings -> SDE trajectory
(jit, sharded over the mesh) -> VAE decode -> rewards on this process's groups
-> advantages -> jitted GRPO update -> metrics, image grids, checkpoints.
Every random draw comes from ``fold_in(key(seed), step)``, the prompts from a
pure function of (seed, step, process): restarting from a checkpoint continues
exactly as an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from prefgrpo_jax import checkpoint, config as config_lib, data, grpo, overlap, run_guards, sampling, sharding, workdir_lock
from prefgrpo_jax import ema as ema_lib
from prefgrpo_jax import lora as lora_lib
from prefgrpo_jax import state as state_lib
from prefgrpo_jax.models import autoencoder
from prefgrpo_jax.pipeline import FluxPipeline
from prefgrpo_jax.rewards import registry
from prefgrpo_jax.train_logging import MetricsLogger, read_metrics, reward_trend, save_image_grid

log = logging.getLogger(__name__)
# Metrics that measure wall time: they differ between otherwise identical runs.
TIMING_KEYS = ("step_time_s", "samples_per_s", "reward_time_s", "eval_time_s", "judge_wait_s")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had NaN/Inf losses or gradients."""


def sampler_config(config: config_lib.RunConfig, image_seq_len: int) -> sampling.SamplerConfig:
    t = config.train
    return sampling.SamplerConfig(
        num_steps=t.num_steps, eta=t.eta, mode=t.step_mode, schedule=t.schedule,
        shift=t.shift, image_seq_len=image_seq_len, quantize_timesteps=t.quantize_timesteps,
        group_size=t.group_size, init_same_noise=t.init_same_noise,
        cfg_scale=float(t.cfg_scale), return_means=bool(t.rationorm),
        sde_window=int(t.sde_window),
    )


def grpo_config(config: config_lib.RunConfig) -> grpo.GRPOConfig:
    t = config.train
    return grpo.GRPOConfig(
        clip_range=t.clip_range, timestep_fraction=t.timestep_fraction, kl_beta=t.kl_beta,
        kl_form=t.kl_form, micro_batches=t.micro_batches,
        timestep_chunk=t.timestep_chunk, rationorm=bool(t.rationorm),
        updates_per_rollout=int(t.updates_per_rollout),
        sde_window=int(t.sde_window),
    )


def lr_schedule(config: config_lib.RunConfig) -> optax.Schedule:
    """Learning rate per optimizer update: linear warmup from 0 over
    ``optim.warmup_steps``, then constant or cosine to 0 at the last update
    (``total_steps x updates_per_rollout``)."""
    o = config.optim
    lr = float(o.learning_rate)
    warmup = int(o.warmup_steps)
    total = int(config.total_steps) * int(config.train.updates_per_rollout)
    if o.schedule == "cosine":  # else "constant" (OptimConfig validates it)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), 0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def build_optimizer(config: config_lib.RunConfig):
    o = config.optim
    return grpo.make_optimizer(
        lr_schedule(config), weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=state_lib.DTYPES[o.mu_dtype],
    )


def prompt_source(config: config_lib.RunConfig, workdir: Path) -> data.DecodedSource:
    path = Path(config.data.prompts)
    if not path.is_file():
        raise FileNotFoundError(
            f"config.data.prompts={str(path)!r} does not exist: give a .txt (one prompt per "
            "line) or .jsonl file with a 'prompt' field"
        )
    if jax.process_count() == 1:
        return data.load_prompts(path, workdir / "tfds")
    # One writer: process 0 prepares the array_record files, the others read them.
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        data.load_prompts(path, workdir / "tfds")
    multihost_utils.sync_global_devices("prompts prepared")
    return data.load_prompts(path, workdir / "tfds", prepare=False)


def _param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_decode(vae: nnx.Module, h: int, w: int) -> tuple[Any, Callable]:
    """``(vae params, decode)``: ``decode(vae_params, packed [B, L, C]) -> images [B, H, W, 3]``
    in [0, 1], jitted; the (sharded) VAE is gathered inside the program."""
    vae_graph, vae_params = nnx.split(vae)
    vae_replicated = sharding.replicated_like(vae_params)

    @jax.jit
    def decode(vae_params, packed):
        vae_params = sharding.gather(vae_params, vae_replicated)
        return nnx.merge(vae_graph, vae_params).decode(autoencoder.unpack_latents(packed, h, w))

    return vae_params, decode


def startup_summary(config: config_lib.RunConfig, mesh, policy: state_lib.Policy, vae_params,
                    sampler: sampling.SamplerConfig, grpo_cfg: grpo.GRPOConfig) -> str:
    devices = jax.devices()
    n_dev = len(devices)
    params, opt_state = policy.abstract_state["params"], policy.abstract_state["opt_state"]
    lines = [
        f"prefgrpo_jax: {jax.process_count()} process(es), {n_dev} {devices[0].platform} device(s) "
        f"({devices[0].device_kind}), mesh {dict(mesh.shape)}",
        f"trainable transformer: {_param_count(params) / 1e6:.2f} M params "
        f"({_tree_bytes(params) / 2**20:.1f} MiB), optimizer state {_tree_bytes(opt_state) / 2**20:.1f} MiB",
    ]
    frozen = {
        "vae": vae_params,
        "text encoders": (nnx.split(policy.pipe.text_encoder)[1], nnx.split(policy.pipe.text_encoder_2)[1]),
    }
    if policy.frozen is not None:
        frozen["transformer base (LoRA)"] = policy.frozen
    for name, tree in frozen.items():
        lines.append(f"frozen {name}: {_param_count(tree) / 1e6:.2f} M params ({_tree_bytes(tree) / 2**20:.1f} MiB)")
    # Each leaf's shard as laid out (FSDP-sharded or replicated; frozen parts too).
    per_device = (state_lib.per_device_bytes(params, policy.state_shardings["params"])
                  + state_lib.per_device_bytes(opt_state, policy.state_shardings["opt_state"])
                  + sum(state_lib.per_device_bytes(t) for t in frozen.values()))
    lines.append(
        f"memory estimate per device (the shards of params, optimizer state and frozen parts; "
        f"no activations): {per_device / 2**30:.3f} GiB"
    )
    if mesh.shape["tensor"] > 1:
        lines.append(f"tensor parallelism over {mesh.shape['tensor']} devices: the FLUX blocks' heads and MLP "
                     "hidden are split over 'tensor'; other parameters are FSDP-split over fsdp x tensor")
    t = config.train
    lines.append(
        f"per step: {t.prompts_per_step} prompts x {t.group_size} images, {sampler.num_steps} SDE "
        f"steps ({sampler.mode}, eta {sampler.eta}), {grpo_cfg.num_train_timesteps(sampler.num_steps)} "
        f"trained timesteps/sample, {grpo_cfg.updates_per_rollout} optimizer step(s) per rollout, "
        f"reward {dict(config.reward.spec)}"
    )
    return "\n".join(lines)


class Trainer:
    """Holds the compiled functions and state of one training run."""

    def __init__(self, config: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str | Path):
        # Typed and validated once, with the batch layout derived for this pod.
        self.config = config = config_lib.build(config, mode="train", num_devices=jax.device_count())
        t = config.train
        if t.prompts_per_step % jax.process_count():
            raise config_lib.ConfigError(
                f"config.train.prompts_per_step={t.prompts_per_step}: must be divisible by the "
                f"{jax.process_count()} processes"
            )
        self.workdir = workdir_lock.prepare_workdir(workdir)
        self.is_chief = jax.process_index() == 0
        # Before anything is loaded: a second run on this workdir stops here.
        self.lock = workdir_lock.WorkdirLock(self.workdir).acquire() if self.is_chief else None
        self.mesh = sharding.make_mesh(config.mesh.sizes())
        self.checkpointer, self.params_checkpointer = state_lib.checkpointers(config, self.workdir)
        self.optimizer, self.lr_schedule = build_optimizer(config), lr_schedule(config)
        self.ema_update = (ema_lib.make_ema_update(float(config.ema.decay), int(config.ema.every))
                           if config.ema.decay > 0 else None)
        policy = state_lib.trainable_policy(config, self.mesh, self.optimizer, ema=self.ema_update is not None,
                                            resuming=self.checkpointer.latest_step() is not None)
        self.pipe, self.velocity_fn, self.lora, self.frozen = policy.pipe, policy.velocity_fn, policy.lora, policy.frozen
        self.state, self.state_shardings, self.ref_params = policy.state, policy.state_shardings, policy.ref_params
        self.h, self.w = self.pipe.latent_hw(t.height, t.width)
        self.latent_shape = ((self.h // 2) * (self.w // 2), self.pipe.transformer.cfg.in_channels)
        self.sampler = sampler_config(config, self.latent_shape[0])
        self.grpo = grpo_config(config)
        self.train_step = grpo.make_train_step(
            self.velocity_fn, self.sampler, self.grpo, self.optimizer,
            jit_kwargs={"out_shardings": (self.state_shardings, sharding.replicated(self.mesh))},
        )
        self.vae_params, self.decode = make_decode(self.pipe.vae, self.h, self.w)
        self.broadcast_group = sharding.make_group_broadcast(self.mesh, t.group_size)
        self.reward = registry.build_reward_mix(
            config.reward.spec, config.reward.options, ddof=int(t.adv_ddof),
            adv_clip_max=t.adv_clip_max, adv_norm=t.adv_norm, gdpo=bool(config.reward.gdpo),
        )
        self.overlap_plan = self.split_step = None
        if t.overlap:
            self._setup_overlap()
        self.local_prompts = t.prompts_per_step // jax.process_count()
        self.stream = data.PromptStream(
            prompt_source(config, self.workdir), self.local_prompts, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        self.root_key = jax.random.key(config.seed)
        self.summary = startup_summary(config, self.mesh, policy, self.vae_params, self.sampler, self.grpo)

    def _setup_overlap(self) -> None:
        """The overlapped step's plan and its micro-batch-by-micro-batch update."""
        t = self.config.train
        if jax.process_count() > 1:
            raise config_lib.ConfigError(
                f"config.train.overlap=True runs in one process (the chunked decode slices the "
                f"global batch by rows), not {jax.process_count()}: set it False")
        self.overlap_plan = overlap.plan(t.prompts_per_step, t.micro_batches, t.adv_norm,
                                         bool(self.config.reward.gdpo))
        if not self.overlap_plan.per_group:
            log.warning("train.overlap: the update waits for every reward (%s); only decoding and "
                        "judging overlap", self.overlap_plan.reason)
        self.split_step = grpo.make_train_step(
            self.velocity_fn, self.sampler, self.grpo, self.optimizer, split=True,
            jit_kwargs={"out_shardings": (self.state_shardings, sharding.replicated(self.mesh))},
        )

    # -- one step -------------------------------------------------------------

    def activations(self):
        """Context pinning activations to the batch sharding while the step is traced."""
        return sharding.activation_sharding(self.mesh, state_lib.activation_rules(self.config))

    def conditioning(self, prompts: list[str]) -> dict[str, jax.Array]:
        """Per-process prompts -> global, batch-sharded cond pytree ``[B, ...]``
        (``B`` = prompts x group size, repeated on device)."""
        txt, txt_ids, pooled = self.pipe.encode_prompt(prompts)
        cond = self.pipe.conditioning(
            txt, txt_ids, pooled, self.config.train.height, self.config.train.width,
            self.config.train.guidance_scale,
        )
        return self.broadcast_group(cond)

    def local_rows(self, array: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded global array, as NumPy."""
        from jax.experimental import multihost_utils

        if jax.process_count() == 1:
            return np.asarray(array)
        return np.asarray(
            multihost_utils.global_array_to_host_local_array(array, self.mesh, sharding.P(sharding.BATCH_AXES))
        )

    def step(self, step: int) -> dict[str, Any]:
        """Runs update number ``step + 1`` and returns its metrics (host floats)."""
        t0 = time.perf_counter()
        cfg = self.config.train
        g = cfg.group_size
        key = jax.random.fold_in(self.root_key, step)
        k_sample, k_train = jax.random.split(key)
        batch_prompts = self.stream.batch_at(step)
        prompts = list(batch_prompts.prompts)
        cond = self.conditioning(prompts)
        # Classifier-free guidance: the unconditional branch is the empty prompt.
        uncond = self.conditioning([""] * len(prompts)) if self.sampler.cfg_scale != 1.0 else None
        window = self.sampler.sde_window
        window_start = 0
        if window:  # Flow-GRPO-Fast: one window start per rollout, uniform in the range
            lo, hi = (int(v) for v in cfg.sde_window_range)
            window_start = jax.random.randint(jax.random.fold_in(k_train, 1), (), lo, hi - window + 1)
        model_params = self.state["params"] if self.frozen is None else (self.state["params"], self.frozen)
        traj = sampling.sample_trajectory(
            self.velocity_fn, self.sampler, model_params, k_sample, cond, self.latent_shape,
            uncond, None, window_start,
        )
        counted = {name: src.counters for name, src in self.reward.sources.items() if src.counters}
        before = {name: dict(read()) for name, read in counted.items()}
        if self.overlap_plan is not None:
            out, adv_all, per_update, local_images, timings = overlap.trainer_step(
                self, traj, prompts, cond, uncond, k_train, window, window_start)
            reward_time = timings["reward_time_s"]
        else:
            out, adv_all, per_update, local_images, reward_time = self._rewards_and_updates(
                traj, prompts, cond, uncond, k_train, window, window_start)
            timings = {}
        request_counts = {}
        for name, read in counted.items():
            request_counts.update(run_guards.source_counters(before[name], read(), name))
        metrics = grpo.combine_update_metrics([sharding.to_host(m) for m in per_update])
        primary = self.config.reward.monitor or max(
            self.reward.weights, key=lambda k: self.reward.weights[k]
        )
        r = np.asarray(out.rewards[primary])
        metrics.update({
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std()),
            "reward_group_std": float(r.std(axis=1).mean()),
            "adv_mean": float(adv_all.mean()),
            "adv_std": float(adv_all.std()),
            "adv_abs_max": float(np.abs(adv_all).max()),
            "learning_rate": float(self.lr_schedule(int(self.state["step"]) - 1)),
            "epoch": int(batch_prompts.epochs[-1]),
        })
        for name, value in out.diagnostics.items():
            metrics[f"reward/{name}"] = float(value)
        if request_counts:  # summed over the processes, each of which judged its own groups
            totals = sharding.allgather_host(np.asarray([list(request_counts.values())], np.float64)).sum(0)
            metrics.update(zip(request_counts, map(float, totals)))
        elapsed = time.perf_counter() - t0
        metrics["reward_time_s"] = reward_time
        if "judge_wait_s" in timings:
            metrics["judge_wait_s"] = timings["judge_wait_s"]
        metrics["step_time_s"] = elapsed
        metrics["samples_per_s"] = cfg.prompts_per_step * g / elapsed
        self._last_images = (prompts, local_images)
        return metrics

    def _rewards_and_updates(self, traj, prompts, cond, uncond, k_train, window, window_start):
        """Decode, rewards, advantages and updates one after the other (not ``train.overlap``).

        Returns ``(RewardOutput, advantages [N, G], [metrics of each update],
        this process's images [n, G, H, W, 3], reward seconds)``."""
        cfg = self.config.train
        g = cfg.group_size
        images = self.decode(self.vae_params, sampling.reward_latents(traj, cfg.reward_image))
        local_images = self.local_rows(images)
        local_images = local_images.reshape(self.local_prompts, g, *local_images.shape[1:])
        t_reward = time.perf_counter()
        # Each process judges its own groups; the small outputs (scores or P) are
        # gathered so advantages and diagnostics are computed on the global batch
        # identically everywhere, then each process keeps its rows.
        local_outputs = {name: src(prompts, local_images) for name, src in self.reward.sources.items()}
        reward_time = time.perf_counter() - t_reward
        outputs = {name: sharding.allgather_host(v) for name, v in local_outputs.items()}
        out = self.reward.from_outputs(outputs)
        adv_all = np.asarray(out.advantages, np.float32)
        rows = slice(jax.process_index() * self.local_prompts, (jax.process_index() + 1) * self.local_prompts)
        advantages = sharding.from_process_local(adv_all[rows].reshape(-1), self.mesh)
        batch = self.rollout_batch(traj, advantages, cond, uncond, k_train, window, window_start)
        self.state, per_update = grpo.rollout_updates(
            self.train_step, self.state, batch, updates=self.grpo.updates_per_rollout, group_size=g,
            ref_params=self.ref_params, frozen=self.frozen, after_update=self.ema_update,
        )
        return out, adv_all, per_update, local_images, reward_time

    def rollout_batch(self, traj, advantages, cond, uncond, k_train, window, window_start) -> dict:
        """The rollout as a ``train_step`` batch with its trained timesteps drawn."""
        return grpo.with_timesteps(
            grpo.rollout_batch(traj, advantages, cond, uncond), k_train,
            num_steps=self.sampler.num_steps, k=self.grpo.num_train_timesteps(self.sampler.num_steps),
            window=window, window_start=window_start,
        )

    # -- the loop -------------------------------------------------------------

    def restore(self) -> int:
        # Setting aside with several processes would desynchronise their views of
        # the saved steps (and so their collective saves): there, skipping is enough.
        found = self.checkpointer.restore_newest_readable(self.state, set_aside=jax.process_count() == 1)
        if found is None:
            return 0
        # self.state was abstract: the restore is the only copy ever allocated.
        latest, self.state, meta = found
        if meta.get("seed") != self.config.seed:
            raise config_lib.ConfigError(
                f"config.seed={self.config.seed} but the checkpoint in {self.checkpointer.directory} "
                f"was written with seed {meta.get('seed')}: use a new --workdir or the same seed"
            )
        run_guards.check_resume_config(meta.get("config", {}), self.config,
                                       f"checkpoint {latest} in {self.checkpointer.directory}")
        log.info("resumed from checkpoint at step %d", latest)
        return int(latest)

    def meta(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "seed": self.config.seed,
            "data_position": self.stream.position_at(step),
            "reference_params": (
                f"initial weights of {self.config.model.path} (not stored)"
                if self.config.train.kl_beta > 0 else None
            ),
            "config": self.config.to_dict(),
        }

    def trained_transformer(self) -> nnx.Module:
        """The served transformer (EMA when ``ema.use``); LoRA's adapters merged into its base."""
        graphdef, _ = nnx.split(self.pipe.transformer)
        served = ema_lib.served_params(self.state, self.config)
        if self.lora is None:
            return nnx.merge(graphdef, served)
        return lora_lib.merged_model(nnx.merge(graphdef, self.frozen), served, self.lora)

    def trained_pipeline(self) -> FluxPipeline:
        """The pipeline with the current trained transformer weights (everything else shared)."""
        pipe = copy.copy(self.pipe)
        pipe.transformer = self.trained_transformer()
        return pipe

    def run(self) -> None:
        cfg = self.config
        if self.is_chief:
            print(self.summary, flush=True)
        evaluator = self.periodic_evaluator()
        start = self.restore()
        logger = MetricsLogger(self.workdir, enabled=self.is_chief, truncate_after=start)
        nonfinite_streak = 0
        signal_watch = run_guards.SignalWatch(self.reward.weights, cfg.train.max_steps_without_signal)
        t_start = time.perf_counter()
        try:
            with checkpoint.PreemptionFlag() as preempt:
                for step in range(start, cfg.total_steps):
                    with self.activations():
                        metrics = self.step(step)
                    done = step + 1
                    metrics["step"] = done
                    nonfinite_streak = nonfinite_streak + 1 if metrics["skipped_nonfinite"] else 0
                    metrics["nonfinite_total"] = float(self.state["opt_state"].total_notfinite)
                    if metrics["skipped_nonfinite"]:
                        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                                    done, nonfinite_streak)
                    evaluated = evaluator is not None and done % cfg.eval.every == 0
                    if evaluated:
                        metrics.update(evaluator(self.trained_pipeline()))
                    if done % cfg.log_every == 0 or done == cfg.total_steps or evaluated:
                        logger.write(done, metrics)
                    if cfg.image_every and (done % cfg.image_every == 0 or done == cfg.total_steps) and self.is_chief:
                        prompts, imgs = self._last_images
                        save_image_grid(self.workdir / "images" / f"step_{done:06d}.png", imgs, prompts)
                    # SIGTERM (GPU schedulers) or JAX's preemption sync point (TPU
                    # maintenance events): every process checkpoints the same step.
                    stop = checkpoint.any_process(preempt.requested) or self.checkpointer.reached_preemption(done)
                    saved = self.save_checkpoint(done, force=stop or done == cfg.total_steps,
                                                 nonfinite_streak=nonfinite_streak)
                    if (self.params_checkpointer is not None and not nonfinite_streak
                            and done % self.params_checkpointer.save_every == 0):
                        # What sample/eval/export serve: the EMA when ema.use.
                        self.params_checkpointer.save(
                            done, ema_lib.served_params(self.state, cfg), self.meta(done))
                    if self.is_chief:
                        _progress(done, cfg.total_steps, start, t_start, metrics)
                    if nonfinite_streak > cfg.train.max_consecutive_nonfinite or (
                            nonfinite_streak and done == cfg.total_steps):
                        raise NonFiniteError(
                            f"{nonfinite_streak} consecutive steps up to step {done} had non-finite "
                            f"losses/gradients (limit config.train.max_consecutive_nonfinite="
                            f"{cfg.train.max_consecutive_nonfinite}; a run may not end in such a streak); "
                            "nothing was checkpointed or exported during it. Lower optim.learning_rate or "
                            "check the reward; the last good checkpoint is step "
                            f"{self.checkpointer.latest_step()} in {self.checkpointer.directory}"
                        )
                    signal_watch.update(metrics)
                    if stop:
                        log.warning("stopping after step %d on preemption signal (%s)", done,
                                    "checkpoint saved" if saved else "no checkpoint: non-finite streak")
                        return
            self.export_final()
            trend = reward_trend(read_metrics(self.workdir)) if self.is_chief else None
            if trend:
                print(f"{trend} [reward_mean = {cfg.reward.monitor or 'the training reward'}]", flush=True)
        finally:
            logger.close()
            self.checkpointer.close()
            if self.params_checkpointer is not None:
                self.params_checkpointer.close()
            if self.lock is not None:
                self.lock.release()

    def periodic_evaluator(self):
        """``evaluate.PeriodicEval`` when ``eval.every`` > 0, else None."""
        if not self.config.eval.every:
            return None
        if jax.process_count() > 1:
            # Sampling from parameters sharded over processes and judging on one of
            # them is not written yet; a multi-host run still trains.
            log.warning("config.eval.every=%d is ignored with %d processes (eval during training runs "
                        "in a single process): run --mode=eval on the checkpoints instead",
                        self.config.eval.every, jax.process_count())
            return None
        from prefgrpo_jax.evaluate import PeriodicEval

        return PeriodicEval(self.config)

    def save_checkpoint(self, done: int, *, force: bool, nonfinite_streak: int) -> bool:
        """Checkpoints at the configured interval (or ``force``), never a state inside a
        non-finite streak: resuming from it would replay the streak."""
        if not force and done % self.checkpointer.save_every:
            return False
        if nonfinite_streak or not run_guards.tree_all_finite(self.state["params"]):
            log.warning("step %d: not checkpointing: the state is inside a non-finite streak "
                        "(%d step(s)) or holds NaN/Inf", done, nonfinite_streak)
            return False
        return self.checkpointer.save(done, self.state, self.meta(done), force=force)

    def export_final(self) -> Path:
        """The trained transformer as a diffusers directory (drop-in ``transformer/``),
        in ``config.export.dtype`` (bf16 by default, as FLUX.1-dev ships). A LoRA run
        writes its adapters in peft format (``export/lora``) and the merged
        transformer only when ``export.lora_merged``."""
        from prefgrpo_jax import export

        if not run_guards.tree_all_finite(self.state["params"]):
            raise NonFiniteError("the trained parameters hold NaN/Inf: not exporting them; the last "
                                 f"good checkpoint is in {self.checkpointer.directory}")
        if self.lora is not None:
            file = lora_lib.save_peft(ema_lib.served_params(self.state, self.config), self.pipe.transformer.cfg,
                                      self.lora, self.workdir / "export" / "lora", dtype=self.config.export.dtype)
            if self.is_chief:
                print(f"exported the LoRA adapters (peft format, FluxPipeline.load_lora_weights) to {file}",
                      flush=True)
            if not self.config.export.lora_merged:
                return file
        model = self.trained_transformer()
        out = self.workdir / "export" / "transformer"
        export.save_transformer(model, out, dtype=self.config.export.dtype)
        if self.is_chief:
            print(f"exported the trained transformer (diffusers format) to {out}", flush=True)
        return out


def _progress(done: int, total: int, start: int, t_start: float, metrics: dict[str, Any]) -> None:
    elapsed = time.perf_counter() - t_start
    per_step = elapsed / max(1, done - start)
    eta = per_step * (total - done)
    width = 24
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    print(
        f"[{bar}] {done}/{total} | loss {metrics['loss']:+.4g} | reward {metrics['reward_mean']:.4f} "
        f"| clip {metrics['clip_fraction']:.3f} | {per_step:.2f} s/step | ETA {_hms(eta)}",
        file=sys.stdout, flush=True,
    )


def _hms(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str | Path) -> None:
    Trainer(config, workdir).run()


__all__ = ["NonFiniteError", "TIMING_KEYS", "Trainer", "train"]
