"""GRPO objective identities and the jitted train step on a toy policy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefgrpo_jax import grpo, sampling
from prefgrpo_jax.rewards import group_advantages, preferences_from_scores, win_rates


def test_on_policy_gradient_is_reinforce():
    # logp_new = theta * features; at theta_old the ratio is 1.
    feats = jnp.array([0.3, -1.2, 0.7, 2.0])
    adv = jnp.array([1.0, -0.5, 2.0, -1.5])
    theta = 0.4
    logp_old = theta * feats

    def loss(th):
        return grpo.clipped_surrogate(th * feats, logp_old, adv, 1e-4)

    g = jax.grad(loss)(theta)
    reinforce = -jnp.mean(adv * feats)  # -mean(A * d log p / d theta)
    np.testing.assert_allclose(float(g), float(reinforce), rtol=1e-6)
    assert float(loss(theta)) == pytest.approx(-float(jnp.mean(adv)), rel=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_zero_outside_clip_range_with_matching_sign(sign):
    # Positive advantage and ratio above 1+eps (or negative and below 1-eps).
    eps = 0.2
    logp_old = jnp.zeros(3)
    adv = jnp.full((3,), sign)
    delta = sign * 0.5  # ratio e^0.5 > 1.2, or e^-0.5 < 0.8
    g = jax.grad(lambda d: grpo.clipped_surrogate(logp_old + d, logp_old, adv, eps))(delta)
    assert float(g) == 0.0
    # With the opposite advantage sign the unclipped term is active again.
    g2 = jax.grad(lambda d: grpo.clipped_surrogate(logp_old + d, logp_old, -adv, eps))(delta)
    assert float(g2) != 0.0


# Toy policy: velocity = a x + b (per channel), so mean(x0) ~ mean(x1) - b.
def toy_velocity(params, x, t, cond):
    del t
    return params["a"] * x + params["b"] + 0.0 * cond["c"][:, None, :]


N_PROMPTS, G, L, C = 4, 8, 4, 2
TARGET = 1.5


def toy_batch_cond():
    return {"c": jnp.zeros((N_PROMPTS * G, C))}


def toy_reward(x0):
    """Verifiable toy reward: -|mean(x0) - target| per sample, [B]."""
    return -jnp.abs(jnp.mean(x0, axis=(1, 2)) - TARGET)


def make_toy(sampler, cfg, lr):
    params = {"a": jnp.zeros(()), "b": jnp.zeros((C,))}
    opt = grpo.make_optimizer(lr, weight_decay=0.0, max_grad_norm=1.0)
    state = grpo.init_train_state(params, opt)
    step = grpo.make_train_step(toy_velocity, sampler, cfg, opt)
    return state, step


def rollout(sampler, params, key):
    cond = toy_batch_cond()
    traj = sampling.sample_trajectory(toy_velocity, sampler, params, key, cond, (L, C))
    rewards = toy_reward(traj.latents[:, -1]).reshape(N_PROMPTS, G)
    P = preferences_from_scores(rewards)
    adv = group_advantages(win_rates(P))
    return traj, grpo.rollout_batch(traj, adv, cond), rewards


def test_ratio_is_one_on_policy_and_step_compiles_once():
    sampler = sampling.SamplerConfig(num_steps=6, eta=0.7, group_size=G)
    cfg = grpo.GRPOConfig(clip_range=1e-4, timestep_fraction=0.6, micro_batches=2, timestep_chunk=3)
    state, _ = make_toy(sampler, cfg, 1e-3)
    counted = chex.assert_max_traces(grpo.make_train_step(toy_velocity, sampler, cfg, grpo.make_optimizer(1e-3), jit=False), n=1)
    step = jax.jit(counted)
    _, batch, _ = rollout(sampler, state["params"], jax.random.key(0))
    new_state, metrics = step(state, batch, jax.random.key(1))
    chex.assert_tree_all_finite((new_state, metrics))
    assert abs(float(metrics["ratio_min"]) - 1) < 1e-6 and abs(float(metrics["ratio_max"]) - 1) < 1e-6
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["approx_kl"]) < 1e-12
    # Second call, same shapes: no retrace (assert_max_traces would raise).
    step(state, batch, jax.random.key(2))
    assert int(new_state["step"]) == 1


def test_accumulation_and_chunking_do_not_change_the_gradient():
    sampler = sampling.SamplerConfig(num_steps=5, eta=0.7, group_size=G)
    params = {"a": jnp.array(0.1), "b": jnp.array([0.2, -0.1])}
    _, batch, _ = rollout(sampler, params, jax.random.key(0))
    # Perturb params so ratios differ from 1 and clipping matters a bit.
    moved = {"a": jnp.array(0.12), "b": jnp.array([0.25, -0.1])}
    grads = []
    for accum, chunk in [(1, 1), (4, 2), (2, 4)]:
        cfg = grpo.GRPOConfig(clip_range=0.05, timestep_fraction=1.0, micro_batches=accum, timestep_chunk=chunk)
        sgd = optax.sgd(1.0)
        step = grpo.make_train_step(toy_velocity, sampler, cfg, sgd)
        start = jax.tree.map(jnp.copy, moved)  # donated by the step
        new, metrics = step({"params": start, "opt_state": sgd.init(start), "step": jnp.zeros((), jnp.int32)}, batch, jax.random.key(3))
        grads.append(jax.tree.map(lambda n, o: o - n, new["params"], moved))
    for g in grads[1:]:
        chex.assert_trees_all_close(g, grads[0], atol=1e-6, rtol=1e-5)


def test_nonfinite_step_is_skipped():
    sampler = sampling.SamplerConfig(num_steps=4, group_size=G)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0)
    state, step = make_toy(sampler, cfg, 1e-2)
    _, batch, _ = rollout(sampler, state["params"], jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    batch["advantages"] = batch["advantages"].at[0].set(jnp.nan)
    state, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["params"]), before)
    assert int(state["opt_state"].total_notfinite) == 1


def test_kl_to_reference():
    sampler = sampling.SamplerConfig(num_steps=4, group_size=G)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0, kl_beta=0.1)
    state, step = make_toy(sampler, cfg, 1e-2)
    _, batch, _ = rollout(sampler, state["params"], jax.random.key(0))
    with pytest.raises(ValueError, match="ref_params"):
        step(state, batch, jax.random.key(1))
    ref = jax.tree.map(jnp.copy, state["params"])
    far = {"a": jnp.array(0.5), "b": jnp.array([1.0, 1.0])}
    # The train state is donated: it must not alias the reference params.
    _, m_same = step(grpo.init_train_state(jax.tree.map(jnp.copy, ref), grpo.make_optimizer(1e-2)), batch, jax.random.key(1), ref)
    _, m_far = step(grpo.init_train_state(far, grpo.make_optimizer(1e-2)), batch, jax.random.key(1), ref)
    assert float(m_same["kl_ref"]) == 0.0 and float(m_far["kl_ref"]) > 0.0


def test_tiny_policy_learns_with_win_rate_rewards():
    sampler = sampling.SamplerConfig(num_steps=6, eta=0.7, group_size=G)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=0.6, timestep_chunk=3)
    state, step = make_toy(sampler, cfg, 5e-2)
    key = jax.random.key(42)
    history = []
    for i in range(50):
        key, k_roll, k_train = jax.random.split(key, 3)
        _, batch, rewards = rollout(sampler, state["params"], k_roll)
        history.append(float(rewards.mean()))
        state, metrics = step(state, batch, k_train)
    start, end = np.mean(history[:5]), np.mean(history[-5:])
    # Reward starts near -|0 - 1.5| and must move clearly towards 0.
    assert start < -1.2, start
    assert end > start + 0.8, (start, end)


def test_guard_ratio_and_kl_forms_match_numpy():
    rng = np.random.default_rng(0)
    n = 3
    logp_new, logp_old = rng.normal(size=n), rng.normal(size=n)
    mu_new, mu_old = rng.normal(size=(n, 4, 2)), rng.normal(size=(n, 4, 2))
    s = np.array([0.3, 0.1, 0.05])
    dt = np.array([-0.2, -0.05, -0.01])
    bias = ((mu_new - mu_old) ** 2).mean(axis=(1, 2)) / (2 * s**2)
    want = np.exp((logp_new - logp_old + bias) * s)
    got = grpo.guard_ratio(*(jnp.asarray(a, jnp.float32) for a in (logp_new, logp_old, mu_new, mu_old, s)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    sq = ((mu_new - mu_old) ** 2).mean(axis=(1, 2))
    pref = grpo.transition_kl(*(jnp.asarray(a, jnp.float32) for a in (mu_new, mu_old, s, dt)), "prefgrpo")
    flow = grpo.transition_kl(*(jnp.asarray(a, jnp.float32) for a in (mu_new, mu_old, s, dt)), "flowgrpo")
    np.testing.assert_allclose(pref, sq / (2 * s**2), rtol=1e-5)
    # Flow-GRPO divides by 2 std_t^2 with std_t = s / sqrt(|dt|): |dt| times smaller.
    np.testing.assert_allclose(flow, sq / (2 * (s / np.sqrt(-dt)) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="kl_form"):
        grpo.transition_kl(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), -jnp.ones(1), "sd3")


def test_sde_window_trains_only_window_steps():
    sampler = sampling.SamplerConfig(num_steps=6, eta=0.7, group_size=G, sde_window=2)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0, sde_window=2)
    assert cfg.num_train_timesteps(6) == 2
    params = {"a": jnp.array(0.1), "b": jnp.array([0.2, -0.1])}
    cond = toy_batch_cond()
    traj = sampling.sample_trajectory(toy_velocity, sampler, params, jax.random.key(0), cond, (L, C), window_start=3)
    batch = grpo.with_timesteps(grpo.rollout_batch(traj, jnp.linspace(-1, 1, N_PROMPTS * G), cond),
                                jax.random.key(1), num_steps=6, k=2, window=2, window_start=3)
    idx = np.asarray(batch["timesteps"])
    assert set(np.unique(idx)) == {3, 4} and all(len(set(r)) == 2 for r in idx)
    opt = grpo.make_optimizer(1e-3)
    step = grpo.make_train_step(toy_velocity, sampler, cfg, opt)
    _, m = step(grpo.init_train_state(params, opt), batch, None)
    # On-policy on stochastic steps: ratio 1. (An ODE step, log-prob 0, would give exp(logp_new) != 1.)
    assert abs(float(m["ratio_min"]) - 1) < 1e-5 and abs(float(m["ratio_max"]) - 1) < 1e-5
    with pytest.raises(ValueError, match="sde_window"):
        step(grpo.init_train_state({"a": jnp.array(0.1), "b": jnp.array([0.2, -0.1])}, opt),
             {k: v for k, v in batch.items() if k != "timesteps"}, jax.random.key(2))
