"""Flow-matching schedules, ODE/SDE steps with Gaussian log-probs, the trajectory.

Convention: sigma runs from 1 (pure noise) to 0 (data); the flow model predicts
the velocity ``v = noise - x0`` so that ``x_{sigma'} = x_sigma + (sigma' - sigma) v``
on the deterministic path. Everything probabilistic is computed in fp32: bf16
inside the SDE step would make very sharp low-noise Gaussians meaningless.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from prefgrpo_jax import sharding

STEP_MODES = ("flow", "dance", "cps")
SCHEDULES = ("sd3", "flux")

# velocity_fn(params, x [B, L, C], timesteps [B] in [0, 1], cond) -> v [B, L, C]
VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


# ---------------------------------------------------------------------------
# Schedules.


def sd3_shift(t: np.ndarray, shift: float) -> np.ndarray:
    """SD3 time shift ``s t / (1 + (s - 1) t)`` (Pref-GRPO default, s = 3)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flux_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift: mu linear in the image token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_time_shift(t: np.ndarray, mu: float) -> np.ndarray:
    """``e^mu / (e^mu + (1/t - 1))``, with t = 0 mapped to 0."""
    t = np.asarray(t, dtype=np.float64)
    safe = np.where(t > 0, t, 1.0)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / safe - 1.0))
    return np.where(t > 0, shifted, 0.0)


def make_sigmas(
    num_steps: int,
    *,
    schedule: str = "sd3",
    shift: float = 3.0,
    image_seq_len: int | None = None,
    mu: float | None = None,
) -> np.ndarray:
    """Noise levels ``[S + 1]`` from 1 down to 0 (fp32).

    Args:
      num_steps: S denoising steps.
      schedule: "sd3" (``shift``-ed linspace, the Pref-GRPO recipe) or "flux"
        (diffusers' FluxPipeline schedule, mu from ``image_seq_len`` unless
        ``mu`` is given, e.g. from a scheduler config with other shift bounds).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    if schedule == "sd3":
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        sigmas = sd3_shift(t, shift)
    elif schedule == "flux":
        if mu is None and image_seq_len is None:
            raise ValueError("schedule='flux' needs image_seq_len (image tokens) or mu")
        sigmas = flux_time_shift(t, flux_mu(image_seq_len) if mu is None else mu)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return sigmas.astype(np.float32)


def model_timesteps(sigma: jax.Array, quantize: bool = False) -> jax.Array:
    """The timestep fed to the model: sigma, optionally ``floor(1000 sigma)/1000``.

    The reference passes integer-valued timesteps ``int(1000 sigma)`` to a model
    that divides by 1000; ``quantize=True`` reproduces that exactly.
    """
    if quantize:
        return jnp.floor(sigma * 1000.0) / 1000.0
    return sigma


# ---------------------------------------------------------------------------
# Steps.


def gaussian_log_prob(
    x: jax.Array, mean: jax.Array, std: jax.Array, *, reduce: str = "mean"
) -> jax.Array:
    """Per-sample Gaussian log-density ``[B]``, mean or sum over non-batch dims."""
    x, mean, std = (a.astype(jnp.float32) for a in (x, mean, std))
    std = jnp.broadcast_to(std, x.shape)
    elementwise = (
        -((x - mean) ** 2) / (2.0 * std**2) - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi)
    )
    axes = tuple(range(1, x.ndim))
    if reduce == "mean":
        return jnp.mean(elementwise, axis=axes)
    if reduce == "sum":
        return jnp.sum(elementwise, axis=axes)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def _per_sample(s: jax.Array | float, x: jax.Array) -> jax.Array:
    """Scalar or ``[B]`` noise level -> broadcastable against ``x [B, ...]``."""
    s = jnp.asarray(s, dtype=jnp.float32)
    if s.ndim == 0:
        return s
    chex.assert_shape(s, (x.shape[0],))
    return s.reshape((-1,) + (1,) * (x.ndim - 1))


def sde_mean_std(
    x: jax.Array,
    v: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    eta: float,
    mode: str = "flow",
    sigma_max: jax.Array | float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the Gaussian SDE transition ``x_sigma -> x_sigma_next``.

    Returns ``mean`` with ``x``'s shape and ``std`` broadcastable to it (fp32).
    """
    x = x.astype(jnp.float32)
    v = v.astype(jnp.float32)
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    dt = s_next - s  # negative: we move towards the data
    if mode == "flow":
        if sigma_max is None:
            _reject_concrete_sigma_one(sigma)
            denom_sigma = s
        else:
            # At sigma = 1 the Flow-GRPO std sqrt(sigma / (1 - sigma)) diverges; the
            # reference substitutes sigmas[1] in the denominator for that step.
            denom_sigma = jnp.where(s == 1.0, jnp.asarray(sigma_max, jnp.float32), s)
        std_t = jnp.sqrt(s / (1.0 - denom_sigma)) * eta
        mean = x * (1.0 + std_t**2 / (2.0 * s) * dt) + v * (
            1.0 + std_t**2 * (1.0 - s) / (2.0 * s)
        ) * dt
        std = std_t * jnp.sqrt(-dt)
    elif mode == "dance":
        x0_hat = x - s * v
        score = -(x - x0_hat * (1.0 - s)) / s**2
        mean = x + dt * v - 0.5 * eta**2 * score * dt
        std = eta * jnp.sqrt(s - s_next)
    elif mode == "cps":
        # Coefficients-preserving sampling (Wang & Yu 2025, Flow-GRPO sde_type="cps"):
        # the next latent keeps the forward process's coefficients, (1 - s') x0 +
        # s' noise, with a share sin(eta pi / 2) of the noise fresh.
        std = s_next * jnp.sin(eta * jnp.pi / 2.0)
        x0_hat = x - s * v
        x1_hat = x + (1.0 - s) * v
        mean = x0_hat * (1.0 - s_next) + x1_hat * jnp.sqrt(jnp.maximum(s_next**2 - std**2, 0.0))
    else:
        raise ValueError(f"unknown SDE step mode {mode!r}; expected one of {STEP_MODES}")
    return mean, std


def _reject_concrete_sigma_one(sigma: Any) -> None:
    try:
        concrete = np.asarray(sigma)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if np.any(concrete == 1.0):
        raise ValueError(
            "mode='flow' at sigma == 1 needs sigma_max (sigmas[1]): the Flow-GRPO std "
            "sqrt(sigma / (1 - sigma)) is infinite there."
        )


def sde_step(
    x: jax.Array,
    v: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    eta: float,
    mode: str = "flow",
    sigma_max: jax.Array | float | None = None,
    key: jax.Array | None = None,
    next_sample: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One stochastic denoising step and its Gaussian log-probability.

    Args:
      x: ``[B, ...]`` current latent at noise level ``sigma``.
      v: ``[B, ...]`` velocity predicted at ``x``.
      sigma, sigma_next: scalars or ``[B]``; ``sigma_next < sigma``.
      eta: noise level of the SDE.
      mode: "flow" (Flow-GRPO, Pref-GRPO's default), "dance" (DanceGRPO) or
        "cps" (coefficients-preserving sampling).
      sigma_max: ``sigmas[1]``, used by "flow" in place of sigma = 1 in the
        std's denominator.
      key: sample a new ``next_sample`` with this key, or
      next_sample: score this given ``[B, ...]`` transition (exactly one of
        ``key``/``next_sample``).

    Returns:
      ``(next_sample, log_prob [B], mean, std)``; log_prob is the per-sample mean
      over non-batch dims of the Gaussian log-density, fp32. For "cps" it is
      ``-mean((next - mean)^2)``, the log-density without its constants and its
      ``1 / (2 std^2)`` scale, as Flow-GRPO computes it (the std is 0 at the
      last step, where the true density is degenerate).
    """
    if (key is None) == (next_sample is None):
        raise ValueError("sde_step needs exactly one of key= (sample) or next_sample= (score)")
    chex.assert_equal_shape([x, v])
    mean, std = sde_mean_std(x, v, sigma, sigma_next, eta=eta, mode=mode, sigma_max=sigma_max)
    if next_sample is None:
        eps = jax.random.normal(key, x.shape, dtype=jnp.float32)
        next_sample = mean + std * eps
    else:
        chex.assert_equal_shape([x, next_sample])
        next_sample = next_sample.astype(jnp.float32)
    if mode == "cps":
        log_prob = -jnp.mean((next_sample - mean) ** 2, axis=tuple(range(1, x.ndim)))
    else:
        log_prob = gaussian_log_prob(next_sample, mean, std)
    return next_sample, log_prob, mean, std


def ode_step(
    x: jax.Array, v: jax.Array, sigma: jax.Array | float, sigma_next: jax.Array | float
) -> jax.Array:
    """Deterministic Euler step of the probability-flow ODE (for evaluation)."""
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * v.astype(x.dtype)


# ---------------------------------------------------------------------------
# The trajectory.


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static configuration of ``sample_trajectory`` (hashable: a jit static arg).

    Attributes:
      num_steps: S denoising steps.
      eta: SDE noise level (0.7 in the Pref-GRPO recipe).
      mode: "flow" | "dance" | "cps" (stochastic, with log-probs) or "ode"
        (deterministic; log-probs are zeros).
      schedule, shift: see ``make_sigmas``.
      image_seq_len: image tokens, needed by ``schedule="flux"`` (unless ``mu``).
      mu: explicit FLUX shift, overriding the one derived from ``image_seq_len``.
      quantize_timesteps: feed ``floor(1000 sigma)/1000`` to the model, as the
        reference's integer timesteps do (default off).
      group_size: G images per prompt; the batch is prompts x G, group-major.
      init_same_noise: all images of a group start from the same noise (the
        reference's default); they diverge through the SDE noise.
      cfg_scale: classifier-free guidance scale; > 1 needs ``uncond``.
      return_means: also return every transition's mean (``Trajectory.means``),
        which GRPO-Guard's ratio (``rationorm``) compares against.
      sde_window: Flow-GRPO-Fast: 0 (every step stochastic) or the number of
        consecutive stochastic steps, from ``window_start`` (a traced argument
        of ``sample_trajectory``); the other steps are ODE steps with
        log-prob 0 and mean = the ODE step.
    """

    num_steps: int = 25
    eta: float = 0.7
    mode: str = "flow"
    schedule: str = "sd3"
    shift: float = 3.0
    image_seq_len: int | None = None
    mu: float | None = None
    quantize_timesteps: bool = False
    group_size: int = 8
    init_same_noise: bool = True
    cfg_scale: float = 1.0
    return_means: bool = False
    sde_window: int = 0

    def sigmas(self) -> np.ndarray:
        return make_sigmas(
            self.num_steps, schedule=self.schedule, shift=self.shift,
            image_seq_len=self.image_seq_len, mu=self.mu,
        )


class Trajectory(NamedTuple):
    """Output of ``sample_trajectory`` (all fp32).

    latents: ``[B, S + 1, L, C]``, ``latents[:, 0]`` is the initial noise and
      ``latents[:, S]`` the final sample.
    log_probs: ``[B, S]``, log-prob of ``latents[:, i + 1]`` given ``latents[:, i]``.
    sigmas: ``[S + 1]``.
    x0_pred: ``[B, L, C]``, the last step's prediction of the clean latent,
      ``latents[:, S-1] - sigmas[S-1] v``: the sample without the last step's
      noise (what the reference decodes for its rewards).
    means: ``[B, S, L, C]`` transition means (``SamplerConfig.return_means``), else None.
    """

    latents: jax.Array
    log_probs: jax.Array
    sigmas: jax.Array
    x0_pred: jax.Array
    means: jax.Array | None = None


def initial_noise(
    key: jax.Array, batch: int, latent_shape: tuple[int, int], group_size: int, same: bool
) -> jax.Array:
    """``[B, L, C]`` standard normal; one draw per group when ``same``."""
    if batch % group_size:
        raise ValueError(f"batch {batch} is not a multiple of group_size {group_size}")
    if not same:
        return jax.random.normal(key, (batch, *latent_shape), jnp.float32)
    per_group = jax.random.normal(key, (batch // group_size, *latent_shape), jnp.float32)
    return jnp.repeat(per_group, group_size, axis=0)


def guided_velocity(
    velocity_fn: VelocityFn,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    cond: Any,
    uncond: Any,
    cfg_scale: float,
) -> jax.Array:
    """Velocity, with classifier-free guidance as one batched cond/uncond pass."""
    if cfg_scale == 1.0 or uncond is None:
        return velocity_fn(params, x, t, cond)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), cond, uncond)
    v = velocity_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    v_cond, v_uncond = jnp.split(v, 2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def _trajectory(
    velocity_fn: VelocityFn,
    config: SamplerConfig,
    params: Any,
    key: jax.Array,
    cond: Any,
    latent_shape: tuple[int, int],
    uncond: Any = None,
    x_init: jax.Array | None = None,
    window_start: jax.Array | int = 0,
) -> Trajectory:
    batch = jax.tree.leaves(cond)[0].shape[0]
    if config.cfg_scale != 1.0 and uncond is None:
        raise ValueError(f"cfg_scale={config.cfg_scale} needs uncond conditioning")
    sigmas_np = config.sigmas()
    sigmas = jnp.asarray(sigmas_np)
    noise_key, step_key = jax.random.split(key)
    if x_init is None:
        x_init = initial_noise(noise_key, batch, latent_shape, config.group_size, config.init_same_noise)
    else:
        chex.assert_shape(x_init, (batch, *latent_shape))
        x_init = x_init.astype(jnp.float32)
    step_keys = jax.random.split(step_key, config.num_steps)
    sigma_max = sigmas[1]

    # params ride in the carry (unchanged): models that use nnx transforms inside
    # (scanned blocks) refuse variables closed over from an outer trace level.
    # The carry's x0 is overwritten each step: only the last one is returned.
    def step(carry, inputs):
        x, _, p = carry
        x = sharding.constrain(x, ("batch", None, None))  # the latent stays with its rows
        i, sigma, sigma_next, k = inputs
        t = jnp.full((batch,), model_timesteps(sigma, config.quantize_timesteps))
        v = guided_velocity(velocity_fn, p, x, t, cond, uncond, config.cfg_scale)
        x0 = x.astype(jnp.float32) - sigma * v.astype(jnp.float32)
        if config.mode == "ode":
            x_next = ode_step(x, v.astype(jnp.float32), sigma, sigma_next)
            out = (x_next, jnp.zeros((batch,), jnp.float32))
        else:
            x_next, log_prob, mean, _ = sde_step(
                x, v, sigma, sigma_next, eta=config.eta, mode=config.mode,
                sigma_max=sigma_max, key=k,
            )
            if config.sde_window:
                on = (i >= window_start) & (i < window_start + config.sde_window)
                x_ode = ode_step(x.astype(jnp.float32), v.astype(jnp.float32), sigma, sigma_next)
                x_next = jnp.where(on, x_next, x_ode)
                log_prob = jnp.where(on, log_prob, 0.0)
                mean = jnp.where(on, mean, x_ode)
            out = (x_next, log_prob)
        if config.return_means:
            out = out + (mean if config.mode != "ode" else x_next,)
        return (x_next, x0, p), out

    (_, x0_pred, _), outs = jax.lax.scan(
        step, (x_init, jnp.zeros_like(x_init), params),
        (jnp.arange(config.num_steps), sigmas[:-1], sigmas[1:], step_keys),
    )
    xs, log_probs = outs[0], outs[1]
    latents = jnp.concatenate([x_init[None], xs], axis=0)  # [S+1, B, L, C]
    return Trajectory(
        latents=jnp.moveaxis(latents, 0, 1),
        log_probs=jnp.moveaxis(log_probs, 0, 1),
        sigmas=sigmas,
        x0_pred=x0_pred,
        means=jnp.moveaxis(outs[2], 0, 1) if config.return_means else None,
    )


REWARD_IMAGES = ("x0_pred", "sample")


def reward_latents(trajectory: Trajectory, which: str) -> jax.Array:
    """The ``[B, L, C]`` latents decoded for the reward.

    ``x0_pred`` (the reference): the last step's clean-latent prediction, no
    noise; ``sample``: the last SDE sample, which still carries the last
    step's noise (std ~0.08 at sigma 0.11 -> 0 in the Pref-GRPO recipe).
    """
    if which == "x0_pred":
        return trajectory.x0_pred
    if which == "sample":
        return trajectory.latents[:, -1]
    raise ValueError(f"unknown reward image {which!r}; expected one of {REWARD_IMAGES}")


@functools.partial(jax.jit, static_argnames=("velocity_fn", "config", "latent_shape"))
def sample_trajectory(
    velocity_fn: VelocityFn,
    config: SamplerConfig,
    params: Any,
    key: jax.Array,
    cond: Any,
    latent_shape: tuple[int, int],
    uncond: Any = None,
    x_init: jax.Array | None = None,
    window_start: jax.Array | int = 0,
) -> Trajectory:
    """The whole denoising loop, one ``lax.scan`` under ``jit``.

    Args:
      velocity_fn: ``(params, x [B,L,C], t [B], cond) -> v [B,L,C]``; pass the
        same function object each call (it is a static argument).
      config: a ``SamplerConfig`` (static).
      params: the policy's parameters (any pytree).
      key: PRNG key; initial noise and every step's noise derive from it.
      cond: conditioning pytree, leaves with leading batch dim
        ``B = prompts x group_size`` (group-major: sample b is in group b // G).
      latent_shape: ``(L, C)`` of one packed latent.
      uncond: conditioning for classifier-free guidance (``cfg_scale > 1``).
      x_init: optional ``[B, L, C]`` initial latents (default: drawn from ``key``).
      window_start: first stochastic step when ``config.sde_window`` (traced).

    Returns:
      A ``Trajectory`` (latents ``[B,S+1,L,C]``, log_probs ``[B,S]``, sigmas ``[S+1]``).
    """
    return _trajectory(velocity_fn, config, params, key, cond, latent_shape, uncond, x_init, window_start)
