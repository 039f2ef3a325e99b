"""The controlled reward models of the toy-world study (prefgrpo_jax/toyworld/noisy_judge.py).

Groups are rendered scenes of random prompts judged against one prompt, so the
verifier's scores within a group differ as they do for a policy's samples.
"""

import numpy as np
import pytest

from prefgrpo_jax.rewards.advantages import normalized_advantages
from prefgrpo_jax.rewards.registry import build_reward_mix
from prefgrpo_jax.toyworld.noisy_judge import JudgementError, NoisyJudge, pair_accuracy
from prefgrpo_jax.toyworld.render import render_batch
from prefgrpo_jax.toyworld.reward import verifier_scores
from prefgrpo_jax.toyworld.scenes import sample_prompt, sample_scene

# |accuracy(pointwise) - accuracy(pairwise)| on held-out pairs: the forms' read
# noises are matched analytically, so the gap is sampling error only (~0.004 std here).
ACCURACY_TOLERANCE = 0.015


@pytest.fixture(scope="module")
def groups():
    """48 groups of 8 images ``[48, 8, 32, 32, 3]``, their prompts and verifier scores ``[48, 8]``."""
    rng = np.random.default_rng(7)
    prompts, images = [], []
    for _ in range(48):
        spec = sample_prompt(rng)
        # half the group draws the group's own prompt, half a random one: scores spread
        specs = [spec if k % 2 == 0 else sample_prompt(rng) for k in range(8)]
        images.append(render_batch([sample_scene(s, rng) for s in specs], 32))
        prompts.append(spec.text)
    images = np.stack(images)
    return prompts, images, verifier_scores(prompts, images)


def test_judgement_error_has_unit_variance_on_fresh_scenes():
    rng = np.random.default_rng(123)  # not the calibration scenes (those come from the judge's seed)
    imgs = render_batch([sample_scene(sample_prompt(rng), rng) for _ in range(400)], 32)
    z = JudgementError(seed=3, size=32)(imgs)
    assert 0.85 < z.std() < 1.15 and abs(z.mean()) < 0.15
    assert not np.allclose(z, JudgementError(seed=4, size=32)(imgs))  # the seed picks the error


def test_forms_have_matched_accuracy_on_heldout_pairs(groups):
    prompts, images, v = groups
    assert np.mean(v.std(axis=1) > 0) > 0.8  # the verifier orders most groups
    acc = {}
    for sigma in (0.0, 0.2, 0.6):
        point, pair = NoisyJudge(sigma, read_noise=0.1, seed=1), NoisyJudge(sigma, read_noise=0.1, seed=1)
        q = point.judgement(v, images)
        np.testing.assert_array_equal(q, pair.judgement(v, images))  # one judgement, same seed
        hits = {"point": [], "pair": []}
        for _ in range(20):  # fresh read noise each call, as over training steps
            hits["point"].append(pair_accuracy(point.point_from(q), v)[0])
            hits["pair"].append(pair_accuracy(pair.pair_from(q), v)[0])
        acc[sigma] = {k: float(np.mean(h)) for k, h in hits.items()}
        assert abs(acc[sigma]["point"] - acc[sigma]["pair"]) <= ACCURACY_TOLERANCE, (sigma, acc[sigma])
    # the noise level sets the accuracy: a curve, not a constant
    assert acc[0.0]["pair"] > acc[0.2]["pair"] + 0.03 > acc[0.6]["pair"] + 0.06
    assert acc[0.6]["pair"] > 0.55  # still informative


def test_without_read_noise_the_forms_order_pairs_identically(groups):
    _, images, v = groups
    judge = NoisyJudge(0.3, seed=5)
    q = judge.judgement(v, images)
    s, P = judge.point_from(q), judge.pair_from(q)
    np.testing.assert_array_equal(np.sign(s[:, :, None] - s[:, None, :]), np.sign(P - 0.5))
    assert pair_accuracy(s, v) == pair_accuracy(P, v)
    assert pair_accuracy(NoisyJudge(0.0).pair_from(v), v)[0] == 1.0


def test_pointwise_form_is_compressed_but_advantage_unchanged(groups):
    _, images, v = groups
    judge = NoisyJudge(0.2, seed=2)
    q = judge.judgement(v, images)
    s = judge.point_from(q, offset=0.5, scale=0.02)
    within = s.std(axis=1, ddof=1)
    assert np.all(np.abs(s - 0.5) < 0.05) and 0 < np.median(within) < 0.01  # an HPS-like range
    np.testing.assert_allclose(np.asarray(normalized_advantages(np.float32(s), "group")),
                               np.asarray(normalized_advantages(np.float32(q), "group")), atol=2e-3)


def test_pairwise_form_is_one_judgement_per_pair():
    P = NoisyJudge(0.0, read_noise=0.5, seed=0).pair_from(np.zeros((3, 5)))
    np.testing.assert_array_equal(P + np.transpose(P, (0, 2, 1)), np.ones((3, 5, 5)))
    np.testing.assert_array_equal(P[:, np.arange(5), np.arange(5)], 0.5)


def test_registered_and_validated(groups):
    prompts, images, _ = groups
    mix = build_reward_mix({"noisy_pairwise": 1.0, "noisy_pointwise": 0.0},
                           options={"noisy_pairwise": {"sigma": 0.2, "seed": 1},
                                    "noisy_pointwise": {"sigma": 0.2, "seed": 1}})
    out = mix(prompts[:2], images[:2])
    assert out.rewards["noisy_pairwise"].shape == (2, 8)
    assert out.rewards["noisy_pointwise"].shape == (2, 8)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        NoisyJudge(-0.1)
    with pytest.raises(ValueError, match="divisible by 4"):
        NoisyJudge(0.1).judgement(np.zeros((1, 2)), np.zeros((1, 2, 30, 30, 3)))


def test_read_noise_does_not_depend_on_earlier_calls(groups):
    """A resumed run's judge has seen nothing before: its draws must equal an
    uninterrupted run's for the same images."""
    _, images, v = groups
    warm, fresh = NoisyJudge(0.2, read_noise=0.1, seed=2), NoisyJudge(0.2, read_noise=0.1, seed=2)
    q = warm.judgement(v, images)
    warm.point_from(q[::-1])  # an earlier step's (different) images
    np.testing.assert_array_equal(warm.point_from(q), fresh.point_from(q))
    np.testing.assert_array_equal(warm.pair_from(q), fresh.pair_from(q))
    assert not np.array_equal(fresh.point_from(q), fresh.point_from(q))  # judged again: fresh noise
