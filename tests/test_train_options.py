"""Config -> trainer wiring of the update options: LR schedules, EMA, CFG, recipes."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefgrpo_jax import config as config_lib, ema, grpo, train
from train_helpers import REPO


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_lr_schedules():
    c = config_lib.base_config()
    c.total_steps, c.train.updates_per_rollout, c.optim.learning_rate = 10, 2, 1e-3
    const = train.lr_schedule(c)
    assert [float(const(i)) for i in (0, 7, 19)] == pytest.approx([1e-3] * 3)
    c.optim.warmup_steps = 4
    warm = train.lr_schedule(c)
    assert [float(warm(i)) for i in (0, 1, 2, 4, 19)] == pytest.approx([0.0, 2.5e-4, 5e-4, 1e-3, 1e-3])
    c.optim.schedule = "cosine"
    cos = train.lr_schedule(c)
    # Warmup to 1e-3 at update 4, then 0.5 (1 + cos(pi k / 16)) x 1e-3 down to 0 at update 20.
    for i in (4, 8, 12, 20):
        assert float(cos(i)) == pytest.approx(0.5 * (1 + np.cos(np.pi * (i - 4) / 16)) * 1e-3, abs=1e-9)


def test_ema_math_every_and_served_params():
    params = {"w": jnp.array([1.0, 2.0])}
    e = ema.ema_step({"w": jnp.array([0.0, 0.0])}, params, 0.9)
    np.testing.assert_allclose(e["w"], [0.1, 0.2], rtol=1e-6)
    update = ema.make_ema_update(0.5, every=2)
    state = {"params": params, "ema": {"w": jnp.zeros(2)}, "step": jnp.array(1)}
    state = update(state)  # step 1: not a multiple of 2, unchanged
    np.testing.assert_array_equal(state["ema"]["w"], [0.0, 0.0])
    state = update({**state, "step": jnp.array(2)})
    np.testing.assert_allclose(state["ema"]["w"], [0.5, 1.0])
    c = config_lib.base_config()
    assert ema.served_params(state, c) is state["params"]
    c.ema.use = True
    assert ema.served_params(state, c) is state["ema"]
    with pytest.raises(ValueError, match="ema.decay"):
        ema.served_params({"params": params}, c)
    with pytest.raises(ValueError, match="decay"):
        ema.make_ema_update(1.0, 1)


def test_ema_follows_the_updates_of_a_rollout():
    # A toy policy trained two updates per rollout; the EMA tracks the params.
    from test_grpo import rollout, toy_velocity, G

    sampler = grpo.sampling.SamplerConfig(num_steps=4, eta=0.7, group_size=G)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0, updates_per_rollout=2)
    opt = grpo.make_optimizer(1e-2, weight_decay=0.0)
    params = {"a": jnp.array(0.1), "b": jnp.array([0.2, -0.1])}
    want = jax.tree.map(np.asarray, params)  # the state (params included) is donated
    _, batch, _ = rollout(sampler, params, jax.random.key(0))
    state = grpo.init_train_state(params, opt, ema=True)
    batch = grpo.with_timesteps(batch, jax.random.key(1), num_steps=4, k=3)
    history = []

    def track(s):
        s = ema.make_ema_update(0.9, 1)(s)
        history.append((jax.tree.map(np.asarray, s["params"]), jax.tree.map(np.asarray, s["ema"])))
        return s

    state, metrics = grpo.rollout_updates(grpo.make_train_step(toy_velocity, sampler, cfg, opt), state, batch,
                                          updates=2, group_size=G, after_update=track)
    assert len(metrics) == 2 and int(state["step"]) == 2
    for p, e in history:
        want = jax.tree.map(lambda w, q: 0.9 * w + 0.1 * q, want, p)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), e, want)


def test_config_reaches_sampler_and_update():
    c = config_lib.base_config()
    c.train.cfg_scale = 4.5
    c.train.rationorm = True
    s = train.sampler_config(c, image_seq_len=64)
    assert s.cfg_scale == 4.5 and s.return_means
    c.train.kl_form, c.train.micro_batches, c.train.updates_per_rollout = "flowgrpo", 2, 4
    g = train.grpo_config(c)
    assert (g.kl_form, g.micro_batches, g.updates_per_rollout, g.rationorm) == ("flowgrpo", 2, 4, True)


def test_cfg_reaches_the_train_step():
    # The update's transitions use the guided velocity when the batch has uncond.
    from test_grpo import toy_velocity

    G, S = 4, 4
    cond = {"c": jnp.ones((G, 2))}
    uncond = {"c": jnp.zeros((G, 2))}

    def velocity(params, x, t, cond):  # the conditioning shifts the velocity
        return toy_velocity(params, x, t, cond) + cond["c"][:, None, :] * params["b"]

    params = {"a": jnp.array(0.1), "b": jnp.array([0.2, -0.1])}
    guided = grpo.sampling.SamplerConfig(num_steps=S, eta=0.7, group_size=G, cfg_scale=3.0)
    traj = grpo.sampling.sample_trajectory(velocity, guided, params, jax.random.key(0), cond, (3, 2), uncond)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0)
    batch = grpo.rollout_batch(traj, jnp.linspace(-1, 1, G), cond, uncond)
    opt = grpo.make_optimizer(1e-3)
    step = grpo.make_train_step(velocity, guided, cfg, opt)
    _, m = step(grpo.init_train_state(jax.tree.map(jnp.copy, params), opt), batch, jax.random.key(1))
    assert abs(float(m["ratio_max"]) - 1) < 1e-5  # on-policy: the guided log-probs are recomputed
    unguided = grpo.make_train_step(velocity, grpo.sampling.SamplerConfig(num_steps=S, eta=0.7, group_size=G), cfg, opt)
    _, m2 = unguided(grpo.init_train_state(jax.tree.map(jnp.copy, params), opt), batch, jax.random.key(1))
    assert abs(float(m2["ratio_max"]) - 1) > 1e-3  # without guidance the transitions are off


@pytest.mark.parametrize("name", ["flux", "flux_paper"])
def test_official_recipes(name, tiny_flux_dir):
    c = load_config(name)
    c.model.path = str(tiny_flux_dir)
    config_lib.validate(c, num_devices=1)
    t = c.train
    assert (t.updates_per_rollout, t.clip_range, t.num_steps, t.eta, t.reward_image) == (2, 1e-4, 25, 0.7, "x0_pred")
    judge = c.reward.options.vlm_judge
    assert judge.model == "UnifiedReward" and judge.max_tokens == 4096 and judge.image_format == "jpeg"
    assert c.reward.monitor == "clip"  # a score that moves, not a win rate (always 0.5 on average)
    if name == "flux":
        assert dict(c.reward.spec) == {"vlm_judge": 0.4, "clip": 0.6} and t.rationorm
    else:
        assert dict(c.reward.spec) == {"vlm_judge": 0.7, "clip": 1.4} and not t.rationorm


def test_ema_is_checkpointed_and_served_when_asked(tiny_flux_dir, tmp_path):
    from flax import nnx

    from prefgrpo_jax import checkpoint, state as state_lib

    c = load_config("tiny")
    c.model.path = str(tiny_flux_dir)
    c.ema.decay = 0.9
    pipe = state_lib.load_pipeline(c)
    _, params = nnx.split(pipe.transformer)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    state = grpo.init_train_state(params, train.build_optimizer(c), ema=True)
    state["ema"] = jax.tree.map(lambda a: a + 1.0, state["ema"])  # distinguishable from params
    want_ema = jax.tree.map(np.asarray, state["ema"])
    want_params = jax.tree.map(np.asarray, state["params"])
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=1, save_every=1)
    ckpt.save(1, state, {"seed": 0}, force=True)
    ckpt.close()
    for use, want in ((True, want_ema), (False, want_params)):
        c.ema.use = use
        loaded, step = state_lib.load_trained_pipeline(config_lib.RunConfig.from_dict(c), tmp_path)
        assert step == 1
        got = jax.tree.map(np.asarray, nnx.split(loaded.transformer)[1])
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)
