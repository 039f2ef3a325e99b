"""The overlapped step: the update fed micro-batch by micro-batch, the reward stream."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefgrpo_jax import grpo, overlap, sampling
from prefgrpo_jax.rewards import registry
from test_grpo import G, N_PROMPTS, rollout, toy_velocity
from test_judge import graded_images, make_judge, server  # noqa: F401
from test_train import clip_dir, test_config  # noqa: F401 (fixtures)


def _setup(updates, micro_batches, kl_beta=0.0):
    sampler = sampling.SamplerConfig(num_steps=4, eta=0.7, group_size=G, return_means=True)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0, updates_per_rollout=updates,
                          micro_batches=micro_batches, rationorm=True, kl_beta=kl_beta)
    opt = grpo.make_optimizer(1e-2, weight_decay=0.0)
    params = {"a": jnp.array(0.1), "b": jnp.array([0.2, -0.1])}
    _, batch, rewards = rollout(sampler, params, jax.random.key(0))
    batch = grpo.with_timesteps(batch, jax.random.key(1), num_steps=4, k=3)
    return sampler, cfg, opt, params, batch


@pytest.mark.parametrize("updates, micro_batches, kl_beta", [(1, 2, 0.0), (2, 4, 0.05)])
def test_overlapped_update_equals_the_sequential_one(updates, micro_batches, kl_beta):
    sampler, cfg, opt, params, batch = _setup(updates, micro_batches, kl_beta)
    adv = np.asarray(batch["advantages"]).reshape(N_PROMPTS, G)
    ref = jax.tree.map(jnp.copy, params) if kl_beta else None
    step = grpo.make_train_step(toy_velocity, sampler, cfg, opt)
    seq_state, seq_metrics = grpo.rollout_updates(
        step, grpo.init_train_state(jax.tree.map(jnp.copy, params), opt), batch,
        updates=updates, group_size=G, ref_params=ref)

    split = grpo.make_train_step(toy_velocity, sampler, cfg, opt, split=True)
    calls = []

    def logged_add(*args):
        calls.append("add")
        return split.add(*args)

    def advantages(groups):
        calls.append(("advantages", groups))
        return adv[groups.start:groups.stop]

    chunks = overlap.group_chunks(N_PROMPTS, micro_batches)
    state, metrics, adv_all = overlap.overlapped_updates(
        split._replace(add=logged_add), step, grpo.init_train_state(jax.tree.map(jnp.copy, params), opt),
        batch, advantages, chunks, updates=updates, group_size=G, ref_params=ref)
    # Micro-batch m is dispatched before the advantages of m + 1 are asked for.
    assert calls == [x for c in chunks for x in (("advantages", c), "add")]
    np.testing.assert_array_equal(adv_all, adv)
    assert len(metrics) == len(seq_metrics) == updates
    for m, s in zip(metrics, seq_metrics):
        # fp32, only the summation order of the micro-batches differs. The loss terms
        # are O(1) (|A| ~ 1) and cancel to ~0 on-policy: its bound is absolute.
        np.testing.assert_allclose(float(m["loss"]), float(s["loss"]), rtol=0, atol=1e-6)
        for name in ("grad_norm", "ratio_mean", "clip_fraction", "kl_ref"):
            np.testing.assert_allclose(float(m[name]), float(s[name]), rtol=1e-5, atol=1e-7, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 state["params"], seq_state["params"])
    assert int(state["step"]) == updates


def test_plan_falls_back_when_advantages_need_the_whole_batch():
    assert overlap.plan(8, 4, "group", False).per_group
    assert [len(c) for c in overlap.plan(8, 4, "group", False).chunks] == [2, 2, 2, 2]
    for args in ((8, 4, "batch", False), (8, 4, "group_global_std", False), (8, 4, "group", True),
                 (6, 4, "group", False)):
        p = overlap.plan(*args)
        assert not p.per_group and p.reason
        assert sum(len(c) for c in p.chunks) == args[0]


def test_to_uint8_rounds_as_the_judge_does():
    from prefgrpo_jax.rewards.judge import image_to_uint8

    x = np.random.default_rng(0).uniform(0, 1, (4, 5, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(overlap.to_uint8(jnp.asarray(x))), image_to_uint8(x))


def test_reward_stream_matches_the_whole_batch_mix(server):
    judge = make_judge(server)
    brightness = registry.pointwise_source("bright", lambda prompts, images: np.asarray(images, np.float32).mean(
        axis=(2, 3, 4)))
    factories = {"vlm_judge": lambda: registry._vlm_judge_factory(judge=judge),
                 "bright": lambda: brightness}
    mix = registry.build_reward_mix({"vlm_judge": 1.0, "bright": 0.5}, factories=factories)
    imgs, _ = graded_images(n=4, g=3)
    prompts = [f"p{n}" for n in range(4)]
    want = mix(prompts, imgs)

    stream = overlap.RewardStream(mix, prompts, 3)
    assert set(stream.rounds) == {"vlm_judge"} and stream.needs_floats
    for groups in overlap.group_chunks(4, 2):
        stream.add(groups, overlap.to_uint8(jnp.asarray(imgs[groups.start:groups.stop])).__array__(),
                   imgs[groups.start:groups.stop])
    early = stream.advantages(range(0, 2))
    np.testing.assert_allclose(early, np.asarray(want.advantages)[:2], rtol=1e-6)
    outputs = stream.outputs()
    got = mix.from_outputs(outputs)
    np.testing.assert_allclose(np.asarray(got.advantages), np.asarray(want.advantages), rtol=1e-6)
    assert judge.stats.requests == 2 * 4 * 3  # the stream's round and the mix's call


@pytest.mark.slow  # ~1-2 min on 2 shared cores: loads the tiny pipeline and compiles both steps
def test_overlapped_trainer_step_equals_the_sequential_one(test_config, server, tmp_path):
    from test_state import _load_config

    from prefgrpo_jax import train

    c = _load_config(test_config)
    c.reward.spec = {"vlm_judge": 1.0}
    c.reward.options = {"vlm_judge": {"base_url": server.url, "model": "m", "timeout_s": 10.0}}
    c.train.micro_batches = 2  # one group per micro-batch of each update
    c.train.overlap = True
    c.image_every = 0
    server.delay_s = 0.05  # the judge answers while the first micro-batch trains
    trainer = train.Trainer(c, tmp_path / "work")
    assert trainer.overlap_plan.per_group
    initial = jax.tree.map(jnp.copy, trainer.state)
    steps = {}
    try:
        for overlap_on in (True, False):  # the same step 0 twice, from the same state
            trainer.state = jax.tree.map(jnp.copy, initial)
            if not overlap_on:
                trainer.overlap_plan = None
            with trainer.activations():
                steps[overlap_on] = (trainer.step(0), jax.tree.map(np.asarray, trainer.state["params"]))
    finally:
        trainer.lock.release()
    (seq, seq_params), (ovl, ovl_params) = steps[False], steps[True]
    assert ovl["judge_wait_s"] >= 0 and "judge_wait_s" not in seq
    assert ovl["vlm_judge/judge_requests"] == seq["vlm_judge/judge_requests"] == 2 * 6
    assert ovl["vlm_judge/judge_late"] == 0
    np.testing.assert_allclose(ovl["adv_std"], seq["adv_std"], rtol=1e-6)
    np.testing.assert_allclose(ovl["loss"], seq["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ovl["grad_norm"], seq["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ovl_params, seq_params)
