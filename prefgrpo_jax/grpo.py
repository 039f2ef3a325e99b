"""The GRPO objective, the jitted train step and the updates of one rollout.

One ``train_step(state, batch, key)`` recomputes, under the current params, the
log-probability of stored SDE transitions at a random subset of timesteps per
sample, forms the PPO-style clipped surrogate on group advantages, accumulates
gradients over micro-batches and timestep chunks (an explicit ``lax.scan``,
equivalent to the reference's backward-per-(sample, timestep) loop), and applies
one optax update. Ratios, log-probs and losses are fp32.

``rollout_updates`` splits one rollout into ``updates_per_rollout`` such steps,
as the reference does (per rank 8 samples, an optimizer step every 4): the
second and later steps score the rollout under already-updated params, so their
ratios differ from 1 and the clip range acts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from prefgrpo_jax import sampling, sharding

TrainState = dict[str, Any]  # {"params", "opt_state", "step"}, big_vision style


KL_FORMS = ("prefgrpo", "flowgrpo")


def surrogate_terms(ratio: jax.Array, adv: jax.Array, clip_range: float) -> jax.Array:
    """Per-element PPO loss ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` (fp32).

    Args:
      ratio, adv: same shape (e.g. ``[B]``).
      clip_range: eps > 0.
    """
    chex.assert_equal_shape([ratio, adv])
    adv = adv.astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.maximum(unclipped, clipped)


def clipped_surrogate(
    logp_new: jax.Array, logp_old: jax.Array, adv: jax.Array, clip_range: float
) -> jax.Array:
    """PPO clipped surrogate ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``.

    Args:
      logp_new, logp_old, adv: same shape (e.g. ``[B]``).
      clip_range: eps > 0.

    Returns:
      Scalar fp32: the mean of the per-element loss, before any accumulation
      scaling.
    """
    chex.assert_equal_shape([logp_new, logp_old, adv])
    ratio = jnp.exp(logp_new.astype(jnp.float32) - logp_old.astype(jnp.float32))
    return jnp.mean(surrogate_terms(ratio, adv, clip_range))


def guard_ratio(
    logp_new: jax.Array,
    logp_old: jax.Array,
    mean_new: jax.Array,
    mean_old: jax.Array,
    noise_scale: jax.Array,
) -> jax.Array:
    """GRPO-Guard's normalised ratio (Pref-GRPO HEAD ``train_flux.py``, ``--rationorm``).

    ``bias = mean((mean_new - mean_old)^2) / (2 s^2)`` re-centres the log-ratio
    (whose expectation under the old policy is ``-bias``, not 0, once the mean
    moves) and the product with ``s`` rescales it so that low-noise steps do not
    dominate: ``ratio = exp((logp_new - logp_old + bias) * s)``.

    Args:
      logp_new, logp_old: ``[n]`` per-sample mean log-densities (fp32).
      mean_new, mean_old: ``[n, ...]`` transition means under the current and
        the rollout's params.
      noise_scale: ``[n]`` the transition std s (``std_t sqrt(|dt|)``).

    Returns:
      ``[n]`` fp32 ratios (gradients flow through ``bias`` too, as in the reference).
    """
    chex.assert_equal_shape([logp_new, logp_old, noise_scale])
    chex.assert_equal_shape([mean_new, mean_old])
    s = noise_scale.astype(jnp.float32)
    diff = mean_new.astype(jnp.float32) - mean_old.astype(jnp.float32)
    bias = jnp.mean(diff**2, axis=tuple(range(1, diff.ndim))) / (2.0 * s**2)
    return jnp.exp((logp_new.astype(jnp.float32) - logp_old.astype(jnp.float32) + bias) * s)


def transition_kl(
    mean: jax.Array, mean_ref: jax.Array, noise_scale: jax.Array, dt: jax.Array, form: str
) -> jax.Array:
    """Per-sample KL between the policy's and the reference's Gaussian transitions.

    Both have the same std s = ``std_t sqrt(|dt|)``, so the KL is a scaled
    squared distance of the means (averaged over latent elements):

    * ``prefgrpo``: ``mean((mu - mu_ref)^2) / (2 s^2)``, the exact per-element
      KL (Pref-GRPO HEAD ``fastvideo/grpo/kl.py``);
    * ``flowgrpo``: ``mean((mu - mu_ref)^2) / (2 std_t^2)`` = |dt| times the
      above (Flow-GRPO ``train_sd3.py``); its ``kl_beta`` values are tuned for
      this smaller quantity.

    Args:
      mean, mean_ref: ``[n, ...]``; noise_scale, dt: ``[n]``.

    Returns:
      ``[n]`` fp32.
    """
    if form not in KL_FORMS:
        raise ValueError(f"unknown kl_form {form!r}; expected one of {KL_FORMS}")
    sq = (mean.astype(jnp.float32) - mean_ref.astype(jnp.float32)) ** 2
    sq = jnp.mean(sq, axis=tuple(range(1, sq.ndim)))
    var = noise_scale.astype(jnp.float32) ** 2
    if form == "flowgrpo":
        var = var / jnp.abs(dt.astype(jnp.float32))
    return sq / (2.0 * var)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Static configuration of the GRPO update.

    Attributes:
      clip_range: ratio clip eps (1e-4 in the Pref-GRPO recipe).
      timestep_fraction: fraction of the first S-1 steps trained per sample
        (drawn per sample; the last, near-deterministic step is never trained).
      kl_beta: weight of the KL to the frozen reference policy (0: off).
      kl_form: "prefgrpo" or "flowgrpo", see ``transition_kl``.
      micro_batches: micro-batches of one optimizer update (gradients summed;
        memory only, the update is the same).
      timestep_chunk: trained timesteps per forward pass; the number of trained
        timesteps must be a multiple of it. Larger = more parallel, more memory.
      rationorm: GRPO-Guard ratio (``guard_ratio``) and the per-element loss
        divided by ``|dt|``; the batch must hold the rollout's ``means``.
      updates_per_rollout: optimizer steps per rollout (``rollout_updates``).
      sde_window: Flow-GRPO-Fast: 0, or the size of the window of stochastic
        steps (``SamplerConfig.sde_window``); only window steps are trained,
        ``timestep_fraction`` of them.
    """

    clip_range: float = 1e-4
    timestep_fraction: float = 0.6
    kl_beta: float = 0.0
    kl_form: str = "prefgrpo"
    micro_batches: int = 1
    timestep_chunk: int = 1
    rationorm: bool = False
    updates_per_rollout: int = 1
    sde_window: int = 0

    def num_train_timesteps(self, num_steps: int) -> int:
        """``max(1, floor(fraction * n))`` trained steps per sample, n = S - 1
        (the last step is never trained) or the SDE window's size."""
        if num_steps < 2:
            raise ValueError("GRPO needs at least 2 sampling steps (the last is not trained)")
        if self.sde_window > num_steps - 1:
            raise ValueError(f"sde_window={self.sde_window} exceeds the {num_steps - 1} trainable steps")
        return max(1, int(self.timestep_fraction * (self.sde_window or num_steps - 1)))


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 1e-4,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, skipping non-finite updates.

    ``mu_dtype`` (e.g. ``jnp.bfloat16``) stores Adam's first moment in that
    dtype (optax casts it back for the update); None keeps the params' dtype.

    ``apply_if_finite`` leaves params and Adam moments untouched on a step whose
    gradient has a NaN/Inf and counts it (``opt_state.total_notfinite``); the
    training loop decides when too many in a row is fatal.
    """
    chain = []
    if max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mu_dtype=mu_dtype))
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=2**30)


def init_train_state(
    params: Any, optimizer: optax.GradientTransformation, *, ema: bool = False
) -> TrainState:
    """``{"params", "opt_state", "step"}``, plus ``"ema"`` (a copy of the params,
    see ``prefgrpo_jax.ema``) when ``ema``."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def select_timesteps(key: jax.Array, batch: int, num_steps: int, k: int) -> jax.Array:
    """``[B, k]`` distinct step indices per sample, uniform from ``[0, S - 1)``."""
    keys = jax.random.split(key, batch)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, num_steps - 1))(keys)
    return perms[:, :k]


def _gather_steps(a: jax.Array, idx: jax.Array) -> jax.Array:
    """``a [b, S', ...]``, ``idx [b, c]`` -> ``[b * c, ...]`` (sample-major)."""
    expanded = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
    taken = jnp.take_along_axis(a, expanded, axis=1)
    return taken.reshape((-1,) + a.shape[2:])


def _repeat_each(tree: Any, c: int) -> Any:
    return jax.tree.map(lambda a: jnp.repeat(a, c, axis=0), tree)


class SplitStep(NamedTuple):
    """``make_train_step(..., split=True)``: one optimizer update, micro-batch by micro-batch.

    ``carry = start(state)``; ``carry = add(state, carry, micro_batch, ref_params, frozen)``
    for each micro-batch (any rows; the sum over them is the update: the
    micro-batches must all be the same size for the loss scale of
    ``micro_batches`` equal parts); ``state, metrics = finish(state, carry)``.
    """

    start: Callable[[TrainState], Any]
    add: Callable[..., Any]
    finish: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    velocity_fn: sampling.VelocityFn,
    sampler: sampling.SamplerConfig,
    grpo: GRPOConfig,
    optimizer: optax.GradientTransformation,
    *,
    jit: bool = True,
    jit_kwargs: dict | None = None,
    split: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]] | SplitStep:
    """Builds ``train_step(state, batch, key, ref_params=None, frozen=None) -> (state, metrics)``.

    ``batch`` holds (B = samples of this update, S = sampler.num_steps):
      latents ``[B, S + 1, L, C]``, log_probs ``[B, S]`` (from the rollout),
      advantages ``[B]``, cond (pytree, leading dim B), optionally uncond;
      means ``[B, S, L, C]`` (the rollout's transition means) iff
      ``grpo.rationorm``; optionally timesteps ``[B, k]`` (the trained step
      indices; drawn from ``key`` when absent).
    ``ref_params`` (needed iff ``grpo.kl_beta > 0``) is the frozen reference.
    ``frozen``: LoRA's frozen base (``prefgrpo_jax.lora``). The model is then
    ``velocity_fn((state["params"], frozen), ...)``: only the adapters get
    gradients and optimizer state, and the KL reference is the adapters
    switched off (zero), so ``ref_params`` is not used.

    With ``jit`` the step is jitted with the state donated; ``jit_kwargs`` adds
    e.g. ``in_shardings``/``out_shardings`` (with ``split``: to ``finish``).

    With ``split`` it returns the same update as a :class:`SplitStep` whose
    micro-batches are fed one call at a time, each as soon as its samples'
    advantages exist (the overlapped step); each ``batch`` given to ``add``
    is one micro-batch and must hold its ``timesteps``.
    """
    if sampler.mode not in sampling.STEP_MODES:
        raise ValueError(f"GRPO trains SDE transitions; sampler.mode={sampler.mode!r} has none")
    if grpo.clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {grpo.clip_range}")
    if grpo.kl_form not in KL_FORMS:
        raise ValueError(f"kl_form={grpo.kl_form!r}: expected one of {KL_FORMS}")
    sigmas = jnp.asarray(sampler.sigmas())
    num_steps = sampler.num_steps
    k = grpo.num_train_timesteps(num_steps)
    c = grpo.timestep_chunk
    if k % c:
        raise ValueError(
            f"{k} trained timesteps per sample are not a multiple of timestep_chunk={c}"
        )
    n_chunks = k // c
    weight = 1.0 / (n_chunks * grpo.micro_batches)

    def chunk_loss(params, frozen, ref_params, x, x_next, logp_old, mean_old, adv, ti, cond, uncond):
        sigma, sigma_next = sigmas[ti], sigmas[ti + 1]
        t = sampling.model_timesteps(sigma, sampler.quantize_timesteps)

        def transition(p):
            p = p if frozen is None else (p, frozen)
            v = sampling.guided_velocity(velocity_fn, p, x, t, cond, uncond, sampler.cfg_scale)
            return sampling.sde_step(
                x, v, sigma, sigma_next, eta=sampler.eta, mode=sampler.mode,
                sigma_max=sigmas[1], next_sample=x_next,
            )

        _, logp_new, mean, std = transition(params)
        # Per-sample transition std s [n] (std is [n, 1, 1] for per-sample sigmas).
        noise_scale = jnp.broadcast_to(std, mean.shape).reshape(mean.shape[0], -1)[:, 0]
        dt = sigma_next - sigma
        if grpo.rationorm:
            ratio = guard_ratio(logp_new, logp_old, mean, mean_old, noise_scale)
            loss = jnp.mean(surrogate_terms(ratio, adv, grpo.clip_range) / jnp.abs(dt))
        else:
            ratio = jnp.exp(logp_new - logp_old)
            loss = clipped_surrogate(logp_new, logp_old, adv, grpo.clip_range)
        kl = jnp.zeros_like(logp_new)
        if grpo.kl_beta > 0:
            _, _, mean_ref, _ = transition(jax.lax.stop_gradient(ref_params))
            kl = transition_kl(mean, mean_ref, noise_scale, dt, grpo.kl_form)
            loss = loss + grpo.kl_beta * jnp.mean(kl)
        aux = {
            "ratio_sum": jnp.sum(ratio),
            "ratio_min": jnp.min(ratio),
            "ratio_max": jnp.max(ratio),
            "clipped": jnp.sum((jnp.abs(ratio - 1.0) > grpo.clip_range).astype(jnp.float32)),
            "approx_kl": jnp.sum(0.5 * (logp_new - logp_old) ** 2),
            "kl_ref": jnp.sum(kl),
        }
        return loss * weight, aux

    grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)

    def check_batch(batch: dict, micro_batches: int) -> tuple[int, jax.Array]:
        """Shape checks; returns ``(B, idx [B, k])`` (the trained step indices)."""
        latents = batch["latents"]
        B = latents.shape[0]
        chex.assert_shape(latents, (B, num_steps + 1, None, None))
        chex.assert_shape(batch["log_probs"], (B, num_steps))
        chex.assert_shape(batch["advantages"], (B,))
        if grpo.rationorm:
            if batch.get("means") is None:
                raise ValueError("rationorm needs the rollout's transition means in batch['means'] "
                                 "(sample with SamplerConfig(return_means=True))")
            chex.assert_shape(batch["means"], (B, num_steps) + latents.shape[2:])
        if B % micro_batches:
            raise ValueError(f"batch {B} is not divisible by micro_batches={micro_batches}")
        if "timesteps" in batch:
            chex.assert_shape(batch["timesteps"], (B, k))
            return B, batch["timesteps"]
        if grpo.sde_window:
            raise ValueError("with sde_window the batch needs its timesteps (with_timesteps and the window start)")
        raise ValueError("the batch needs its timesteps [B, k] (with_timesteps)")

    def split_micro(batch: dict, idx: jax.Array, micro_batches: int) -> dict:
        """The batch as ``micro_batches`` stacked micro-batches ``[M, b, ...]``."""
        b = batch["latents"].shape[0] // micro_batches

        def micro(a):  # [B, ...] -> [micro_batches, b, ...], strided
            # Micro-batch m takes rows m, m + M, m + 2M, ...: with the batch split
            # over devices in contiguous blocks, every micro-batch spans every
            # device (contiguous slices would leave devices idle and reshard).
            # The update sums over all micro-batches, so only the order changes.
            strided = a.reshape((b, micro_batches) + a.shape[1:]).swapaxes(0, 1)
            return sharding.constrain(strided, (None, "batch") + (None,) * (a.ndim - 1))

        return {
            "latents": micro(batch["latents"]),
            "log_probs": micro(batch["log_probs"].astype(jnp.float32)),
            "means": jax.tree.map(micro, batch.get("means") if grpo.rationorm else None),
            "adv": micro(batch["advantages"].astype(jnp.float32)),
            "idx": micro(idx).reshape(micro_batches, b, n_chunks, c).swapaxes(1, 2),  # [M, n, b, c]
            "cond": jax.tree.map(micro, batch["cond"]),
            "uncond": jax.tree.map(micro, batch.get("uncond")),
        }

    def zero_carry(params):
        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero_aux = {
            "loss": 0.0, "ratio_sum": 0.0, "ratio_min": jnp.inf, "ratio_max": -jnp.inf,
            "clipped": 0.0, "approx_kl": 0.0, "kl_ref": 0.0, "samples": 0.0,
        }
        return zero_grads, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), zero_aux)

    def accumulate(params, frozen, ref_params, carry, mb):
        """Adds one micro-batch's gradient and statistics to ``carry``."""
        def over_chunks(carry, ti):  # ti [b, c]
            grads, acc = carry
            x = _gather_steps(mb["latents"], ti)
            x_next = _gather_steps(mb["latents"], ti + 1)
            logp_old = _gather_steps(mb["log_probs"][..., None], ti)[:, 0]
            mean_old = None if mb["means"] is None else _gather_steps(mb["means"], ti)
            adv = jnp.repeat(mb["adv"], c)
            cond = _repeat_each(mb["cond"], c)
            uncond = _repeat_each(mb["uncond"], c)
            (loss, aux), g = grad_fn(
                params, frozen, ref_params, x, x_next, logp_old, mean_old, adv, ti.reshape(-1),
                cond, uncond,
            )
            grads = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), grads, g)
            acc = {
                "loss": acc["loss"] + loss,
                "ratio_sum": acc["ratio_sum"] + aux["ratio_sum"],
                "ratio_min": jnp.minimum(acc["ratio_min"], aux["ratio_min"]),
                "ratio_max": jnp.maximum(acc["ratio_max"], aux["ratio_max"]),
                "clipped": acc["clipped"] + aux["clipped"],
                "approx_kl": acc["approx_kl"] + aux["approx_kl"],
                "kl_ref": acc["kl_ref"] + aux["kl_ref"],
                "samples": acc["samples"],
            }
            return (grads, acc), None

        (grads, acc), _ = jax.lax.scan(over_chunks, carry, mb["idx"])
        return grads, {**acc, "samples": acc["samples"] + mb["adv"].shape[0]}

    def finish(state: TrainState, carry) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update from the accumulated gradients, and the metrics."""
        grads, acc = carry
        params = state["params"]
        grad_norm = optax.global_norm(grads)
        # A non-finite loss with finite gradients must not slip through either.
        finite = jnp.isfinite(acc["loss"]) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda n, o: n.astype(o.dtype), new_params, params)
        n_elem = acc["samples"] * k
        metrics = {
            "loss": acc["loss"],
            "clip_fraction": acc["clipped"] / n_elem,
            "approx_kl": acc["approx_kl"] / n_elem,
            "kl_ref": acc["kl_ref"] / n_elem,
            "ratio_mean": acc["ratio_sum"] / n_elem,
            "ratio_min": acc["ratio_min"],
            "ratio_max": acc["ratio_max"],
            "grad_norm": grad_norm,
            "skipped_nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        new_state = {**state, "params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    def reference(params, ref_params, frozen):
        """The KL reference: ``ref_params``, or with LoRA the adapters at zero (the base)."""
        if frozen is not None and grpo.kl_beta > 0:
            return jax.tree.map(jnp.zeros_like, params)  # no copy of the weights
        if grpo.kl_beta > 0 and ref_params is None:
            raise ValueError("kl_beta > 0 needs ref_params (the frozen reference policy)")
        return ref_params

    def train_step(state: TrainState, batch: dict, key: jax.Array, ref_params: Any = None,
                   frozen: Any = None):
        ref_params = reference(state["params"], ref_params, frozen)
        if "timesteps" not in batch and not grpo.sde_window:
            batch = {**batch, "timesteps": select_timesteps(key, batch["latents"].shape[0], num_steps, k)}
        _, idx = check_batch(batch, grpo.micro_batches)
        params = state["params"]
        carry, _ = jax.lax.scan(
            lambda carry, mb: (accumulate(params, frozen, ref_params, carry, mb), None),
            zero_carry(params), split_micro(batch, idx, grpo.micro_batches),
        )
        return finish(state, carry)

    if split:
        def start(state: TrainState):
            return zero_carry(state["params"])

        def add(state: TrainState, carry, batch: dict, ref_params: Any = None, frozen: Any = None):
            ref_params = reference(state["params"], ref_params, frozen)
            _, idx = check_batch(batch, 1)
            mb = jax.tree.map(lambda a: a[0], split_micro(batch, idx, 1))
            return accumulate(state["params"], frozen, ref_params, carry, mb)

        if not jit:
            return SplitStep(start, add, finish)
        kw = dict(jit_kwargs or {})
        return SplitStep(
            jax.jit(start),
            jax.jit(add, donate_argnums=(1,)),
            jax.jit(finish, donate_argnums=(0,), **kw),
        )
    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,), **(jit_kwargs or {}))


@functools.partial(jax.jit, static_argnames=("num_steps", "k", "window"))
def with_timesteps(
    batch: dict, key: jax.Array, *, num_steps: int, k: int, window: int = 0,
    window_start: jax.Array | int = 0,
) -> dict:
    """``batch`` plus ``timesteps [B, k]`` drawn for the whole rollout (jitted, so
    the draw lands on the batch's devices): k distinct steps of ``[0, S - 1)``,
    or of the SDE window ``[window_start, window_start + window)``."""
    B = batch["latents"].shape[0]
    if window:
        idx = window_start + select_timesteps(key, B, window + 1, k)
    else:
        idx = select_timesteps(key, B, num_steps, k)
    return {**batch, "timesteps": idx}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def rollout_part(batch: dict, update: int, updates: int, group_size: int) -> dict:
    """The samples of update ``update`` of ``updates``: a slice of every group.

    Update u takes images ``[u G/U, (u+1) G/U)`` of every group, as the reference
    does with one group per rank and an optimizer step every G/U samples; every
    update sees every prompt, and a batch sharded by whole groups stays balanced.

    Args:
      batch: pytree with leading dim ``B = prompts x G`` (group-major).

    Returns:
      The same pytree with leading dim ``B / U``.
    """
    if group_size % updates:
        raise ValueError(f"group_size={group_size} is not divisible by updates_per_rollout={updates}")
    per = group_size // updates

    def take(a):
        n = a.shape[0] // group_size
        parts = a.reshape((n, updates, per) + a.shape[1:])
        return parts[:, update].reshape((n * per,) + a.shape[1:])

    return jax.tree.map(take, batch)


def combine_update_metrics(per_update: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of a rollout's updates: means (min/max for the ratio extremes,
    any for skipped steps), plus ``<name>/update<u>`` for the clip fraction,
    ratio spread and loss of each update (update 1 is on-policy)."""
    host = [{k: float(v) for k, v in m.items()} for m in per_update]
    out = {k: sum(m[k] for m in host) / len(host) for k in host[0]}
    out["ratio_min"] = min(m["ratio_min"] for m in host)
    out["ratio_max"] = max(m["ratio_max"] for m in host)
    out["skipped_nonfinite"] = max(m["skipped_nonfinite"] for m in host)
    if len(host) > 1:
        for u, m in enumerate(host, start=1):
            for name in ("clip_fraction", "ratio_min", "ratio_max", "loss", "grad_norm"):
                out[f"{name}/update{u}"] = m[name]
    return out


def rollout_updates(
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    state: TrainState,
    batch: dict,
    *,
    updates: int,
    group_size: int,
    ref_params: Any = None,
    frozen: Any = None,
    after_update: Callable[[TrainState], TrainState] | None = None,
) -> tuple[TrainState, list[dict[str, jax.Array]]]:
    """Runs the ``updates`` optimizer steps of one rollout.

    Args:
      train_step: from ``make_train_step``.
      batch: the whole rollout (``rollout_batch``) with ``timesteps [B, k]``
        already drawn, so each sample trains the same steps whatever update
        it lands in.
      ref_params, frozen: passed to ``train_step`` (the KL reference; LoRA's base).
      after_update: applied to the state after each step (e.g. the EMA).

    Returns:
      ``(state, [metrics of each update])``.
    """
    if "timesteps" not in batch:
        raise ValueError("rollout_updates needs batch['timesteps'] (select_timesteps for the whole rollout)")
    metrics = []
    for u in range(updates):
        part = rollout_part(batch, u, updates, group_size)
        state, m = train_step(state, part, None, ref_params, frozen)
        if after_update is not None:
            state = after_update(state)
        metrics.append(m)
    return state, metrics


def rollout_batch(
    trajectory: sampling.Trajectory, advantages: jax.Array, cond: Any, uncond: Any = None
) -> dict[str, Any]:
    """Packs a sampled trajectory and its advantages into a ``train_step`` batch
    (with the transition means when the sampler stored them, for rationorm)."""
    batch = {
        "latents": trajectory.latents,
        "log_probs": trajectory.log_probs,
        "advantages": advantages.reshape(-1),
        "cond": cond,
    }
    if trajectory.means is not None:
        batch["means"] = trajectory.means
    if uncond is not None:
        batch["uncond"] = uncond
    return batch


__all__ = [
    "GRPOConfig",
    "KL_FORMS",
    "SplitStep",
    "TrainState",
    "clipped_surrogate",
    "combine_update_metrics",
    "guard_ratio",
    "init_train_state",
    "make_optimizer",
    "make_train_step",
    "rollout_batch",
    "rollout_part",
    "rollout_updates",
    "select_timesteps",
    "surrogate_terms",
    "transition_kl",
    "with_timesteps",
]
