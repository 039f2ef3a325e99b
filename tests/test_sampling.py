"""SDE steps, log-probs and the jitted trajectory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import norm

from prefgrpo_jax import sampling


def numpy_step_mean_std(x, v, sigma, sigma_next, eta, mode, sigma_max):
    """Independent NumPy transcription of the published formulas (MISSION.md)."""
    x = x.astype(np.float64)
    v = v.astype(np.float64)
    dt = sigma_next - sigma
    if mode == "flow":
        denom = sigma_max if sigma == 1.0 else sigma
        std_t = np.sqrt(sigma / (1 - denom)) * eta
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, std_t * np.sqrt(-dt)
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    return mean, eta * np.sqrt(sigma - sigma_next)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(["flow", "dance"]),
    batch=st.integers(1, 3),
    dims=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    num_steps=st.integers(2, 30),
    which=st.sampled_from(["first", "middle", "last"]),
    eta=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**16),
)
def test_sde_log_prob_matches_scipy(mode, batch, dims, num_steps, which, eta, seed):
    sigmas = sampling.make_sigmas(num_steps, shift=3.0)
    i = {"first": 0, "middle": num_steps // 2, "last": num_steps - 1}[which]
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    rng = np.random.default_rng(seed)
    shape = (batch, *dims)
    x = rng.normal(size=shape).astype(np.float32)
    v = rng.normal(size=shape).astype(np.float32)
    nxt, log_prob, mean, std = sampling.sde_step(
        jnp.asarray(x), jnp.asarray(v), sigma, sigma_next, eta=eta, mode=mode,
        sigma_max=float(sigmas[1]), key=jax.random.key(seed),
    )
    assert log_prob.shape == (batch,) and log_prob.dtype == jnp.float32
    ref_mean, ref_std = numpy_step_mean_std(x, v, sigma, sigma_next, eta, mode, float(sigmas[1]))
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(np.broadcast_to(std, shape).flat[0]), ref_std, rtol=1e-5)
    ref_lp = norm.logpdf(np.asarray(nxt, np.float64), ref_mean, ref_std).reshape(batch, -1).mean(1)
    np.testing.assert_allclose(np.asarray(log_prob), ref_lp, rtol=1e-4, atol=1e-3 * max(1.0, abs(np.log(ref_std))))
    # Scoring the same transition again gives the same log-prob.
    _, lp2, _, _ = sampling.sde_step(
        jnp.asarray(x), jnp.asarray(v), sigma, sigma_next, eta=eta, mode=mode,
        sigma_max=float(sigmas[1]), next_sample=nxt,
    )
    np.testing.assert_array_equal(np.asarray(lp2), np.asarray(log_prob))


def test_summed_log_prob_and_per_sample_sigmas():
    x = jnp.ones((2, 3, 4))
    mean = jnp.zeros((2, 3, 4))
    std = jnp.full((2, 1, 1), 0.5)
    lp_sum = sampling.gaussian_log_prob(x, mean, std, reduce="sum")
    np.testing.assert_allclose(np.asarray(lp_sum), norm.logpdf(1.0, 0.0, 0.5) * 12, rtol=1e-6)
    # Per-sample noise levels [B] equal two scalar calls.
    sig = jnp.array([0.9, 0.5])
    sig_next = jnp.array([0.8, 0.3])
    v = jnp.full((2, 3, 4), 0.3)
    _, lp, _, _ = sampling.sde_step(x, v, sig, sig_next, eta=0.7, next_sample=x * 0.9)
    for b in range(2):
        _, lpb, _, _ = sampling.sde_step(x[b:b+1], v[b:b+1], float(sig[b]), float(sig_next[b]), eta=0.7, next_sample=x[b:b+1] * 0.9)
        np.testing.assert_allclose(np.asarray(lp[b]), np.asarray(lpb[0]), rtol=1e-6)


def test_sde_step_argument_errors():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="exactly one"):
        sampling.sde_step(x, x, 0.5, 0.4, eta=0.7)
    with pytest.raises(ValueError, match="sigma_max"):
        sampling.sde_step(x, x, 1.0, 0.9, eta=0.7, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown SDE step mode"):
        sampling.sde_step(x, x, 0.5, 0.4, eta=0.7, mode="ddim", key=jax.random.key(0))


def test_sd3_and_flux_schedules_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = sampling.make_sigmas(25, shift=3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
    t = np.linspace(1, 0, 26)
    np.testing.assert_allclose(s, 3 * t / (1 + 2 * t), rtol=1e-6)

    seq_len = 1024
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    num_steps = 10
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=sampling.flux_mu(seq_len))
    ours = sampling.make_sigmas(num_steps, schedule="flux", image_seq_len=seq_len)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=1e-5, atol=1e-6)


def test_quantized_timesteps():
    t = sampling.model_timesteps(jnp.array([0.98765, 0.5]), quantize=True)
    np.testing.assert_allclose(np.asarray(t), [0.987, 0.5], atol=1e-7)


# A tiny conditioned "velocity model": v = tanh(x W + t b + cond).
def toy_velocity(params, x, t, cond):
    h = jnp.einsum("blc,cd->bld", x, params["w"]) + t[:, None, None] * params["b"]
    return jnp.tanh(h + cond["bias"][:, None, :])


def toy_setup(batch=6, L=5, C=3):
    key = jax.random.key(0)
    params = {"w": 0.3 * jax.random.normal(key, (C, C)), "b": jnp.ones((C,)) * 0.1}
    cond = {"bias": jnp.repeat(jax.random.normal(jax.random.key(1), (batch // 3, C)), 3, axis=0)}
    return params, cond, (L, C)


@pytest.mark.parametrize("mode", ["flow", "dance"])
def test_trajectory_shapes_group_noise_and_rescoring(mode):
    params, cond, shape = toy_setup()
    cfg = sampling.SamplerConfig(num_steps=6, eta=0.7, mode=mode, group_size=3)
    traj = sampling.sample_trajectory(toy_velocity, cfg, params, jax.random.key(3), cond, shape)
    chex.assert_shape(traj.latents, (6, 7, 5, 3))
    chex.assert_shape(traj.log_probs, (6, 6))
    chex.assert_tree_all_finite(traj)
    # Same initial noise within a group, different across groups and after step 0.
    np.testing.assert_array_equal(np.asarray(traj.latents[0, 0]), np.asarray(traj.latents[2, 0]))
    assert not np.allclose(traj.latents[0, 0], traj.latents[3, 0])
    assert not np.allclose(traj.latents[0, 1], traj.latents[1, 1])
    # Each stored transition re-scored step by step gives the stored log-prob.
    sig = traj.sigmas
    for i in range(cfg.num_steps):
        x = traj.latents[:, i]
        v = toy_velocity(params, x, jnp.full((6,), sig[i]), cond)
        _, lp, _, _ = sampling.sde_step(x, v, sig[i], sig[i + 1], eta=0.7, mode=mode, sigma_max=sig[1], next_sample=traj.latents[:, i + 1])
        np.testing.assert_allclose(np.asarray(lp), np.asarray(traj.log_probs[:, i]), atol=1e-6, rtol=1e-6)


def test_trajectory_compiles_once_and_is_deterministic():
    params, cond, shape = toy_setup()
    cfg = sampling.SamplerConfig(num_steps=4, group_size=3)
    counted = chex.assert_max_traces(sampling._trajectory, n=1)
    jitted = jax.jit(counted, static_argnums=(0, 1, 5))
    a = jitted(toy_velocity, cfg, params, jax.random.key(0), cond, shape)
    b = jitted(toy_velocity, cfg, params, jax.random.key(0), cond, shape)
    c = jitted(toy_velocity, cfg, params, jax.random.key(1), cond, shape)
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))
    assert not np.allclose(a.latents, c.latents)
    # The public jitted entry point adds a single compiled version for two calls.
    before = sampling.sample_trajectory._cache_size()
    sampling.sample_trajectory(toy_velocity, cfg, params, jax.random.key(0), cond, shape)
    sampling.sample_trajectory(toy_velocity, cfg, params, jax.random.key(5), cond, shape)
    assert sampling.sample_trajectory._cache_size() == before + 1


def test_ode_mode_and_cfg():
    params, cond, shape = toy_setup()
    cfg = sampling.SamplerConfig(num_steps=4, mode="ode", group_size=3)
    traj = sampling.sample_trajectory(toy_velocity, cfg, params, jax.random.key(0), cond, shape)
    x = traj.latents[:, 0]
    for i in range(4):
        v = toy_velocity(params, x, jnp.full((6,), traj.sigmas[i]), cond)
        x = x + (traj.sigmas[i + 1] - traj.sigmas[i]) * v
    np.testing.assert_allclose(np.asarray(traj.latents[:, -1]), np.asarray(x), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(traj.log_probs), 0.0)
    # CFG: batched cond/uncond equals two separate passes combined.
    uncond = {"bias": jnp.zeros_like(cond["bias"])}
    xg = jax.random.normal(jax.random.key(2), (6, *shape))
    t = jnp.full((6,), 0.5)
    v = sampling.guided_velocity(toy_velocity, params, xg, t, cond, uncond, 4.0)
    vc, vu = toy_velocity(params, xg, t, cond), toy_velocity(params, xg, t, uncond)
    np.testing.assert_allclose(np.asarray(v), np.asarray(vu + 4.0 * (vc - vu)), atol=1e-6)
    with pytest.raises(ValueError, match="uncond"):
        sampling.sample_trajectory(toy_velocity, sampling.SamplerConfig(num_steps=2, group_size=3, cfg_scale=2.0), params, jax.random.key(0), cond, shape)


def test_reward_sees_the_last_x0_prediction_and_means_are_stored():
    params, cond, shape = toy_setup()
    cfg = sampling.SamplerConfig(num_steps=5, eta=0.7, group_size=3, return_means=True)
    traj = sampling.sample_trajectory(toy_velocity, cfg, params, jax.random.key(4), cond, shape)
    S, sig = cfg.num_steps, traj.sigmas
    x_last = traj.latents[:, S - 1]
    v = toy_velocity(params, x_last, jnp.full((6,), sig[S - 1]), cond)
    want = np.asarray(x_last) - float(sig[S - 1]) * np.asarray(v)  # x_{S-1} - sigma_{S-1} v
    np.testing.assert_allclose(np.asarray(sampling.reward_latents(traj, "x0_pred")), want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sampling.reward_latents(traj, "sample")), np.asarray(traj.latents[:, -1]))
    # The final SDE sample still carries the last step's noise; the x0-prediction does not.
    assert not np.allclose(want, np.asarray(traj.latents[:, -1]), atol=1e-3)
    with pytest.raises(ValueError, match="x0_pred"):
        sampling.reward_latents(traj, "final")
    # Stored means: each is the transition mean at its step, from the NumPy formula.
    chex.assert_shape(traj.means, (6, S, *shape))
    for i in (0, S - 1):
        x = traj.latents[:, i]
        vi = toy_velocity(params, x, jnp.full((6,), sig[i]), cond)
        mean, _ = numpy_step_mean_std(np.asarray(x), np.asarray(vi), float(sig[i]), float(sig[i + 1]), 0.7, "flow", float(sig[1]))
        np.testing.assert_allclose(np.asarray(traj.means[:, i]), mean, atol=1e-5)
    assert sampling.sample_trajectory(toy_velocity, sampling.SamplerConfig(num_steps=5, group_size=3),
                                      params, jax.random.key(4), cond, shape).means is None


def test_cps_step_matches_numpy():
    rng = np.random.default_rng(7)
    x, v, nxt = (rng.normal(size=(2, 4, 3)).astype(np.float32) for _ in range(3))
    sigma, sigma_next, eta = 0.6, 0.45, 0.7
    _, lp, mean, std = sampling.sde_step(jnp.asarray(x), jnp.asarray(v), sigma, sigma_next, eta=eta, mode="cps",
                                         next_sample=jnp.asarray(nxt))
    # Wang & Yu's coefficients-preserving step, as Flow-GRPO reads it.
    s_t = sigma_next * np.sin(eta * np.pi / 2)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    want_mean = x0 * (1 - sigma_next) + x1 * np.sqrt(sigma_next**2 - s_t**2)
    np.testing.assert_allclose(np.asarray(mean), want_mean, atol=1e-6)
    np.testing.assert_allclose(float(std), s_t, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lp), -((nxt - want_mean) ** 2).mean(axis=(1, 2)), rtol=1e-5)
    # At the last step (sigma' = 0) the step is deterministic: the x0-prediction.
    nxt0, _, mean0, std0 = sampling.sde_step(jnp.asarray(x), jnp.asarray(v), 0.2, 0.0, eta=eta, mode="cps",
                                            key=jax.random.key(0))
    assert float(std0) == 0.0
    np.testing.assert_allclose(np.asarray(nxt0), x - 0.2 * v, atol=1e-6)


def test_sde_window_is_stochastic_only_inside_the_window():
    params, cond, shape = toy_setup()
    cfg = sampling.SamplerConfig(num_steps=6, eta=0.7, group_size=3, sde_window=2, return_means=True)
    traj = sampling.sample_trajectory(toy_velocity, cfg, params, jax.random.key(3), cond, shape, window_start=2)
    sig = traj.sigmas
    for i in range(6):
        x = traj.latents[:, i]
        v = toy_velocity(params, x, jnp.full((6,), sig[i]), cond)
        if i in (2, 3):  # inside: an SDE transition, log-prob from the NumPy Gaussian
            mean, std = numpy_step_mean_std(np.asarray(x), np.asarray(v), float(sig[i]), float(sig[i + 1]), 0.7, "flow", float(sig[1]))
            nxt = np.asarray(traj.latents[:, i + 1], np.float64)
            want = norm.logpdf(nxt, mean, std).mean(axis=(1, 2))
            np.testing.assert_allclose(np.asarray(traj.log_probs[:, i]), want, rtol=1e-4)
            assert not np.allclose(nxt, np.asarray(x + (sig[i + 1] - sig[i]) * v), atol=1e-3)
        else:  # outside: the Euler ODE step, log-prob 0
            np.testing.assert_allclose(np.asarray(traj.latents[:, i + 1]), np.asarray(x + (sig[i + 1] - sig[i]) * v), atol=1e-6)
            np.testing.assert_array_equal(np.asarray(traj.log_probs[:, i]), 0.0)
