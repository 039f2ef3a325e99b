"""Win rates and group advantages: identities and the paper's worked example."""

import numpy as np
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from prefgrpo_jax.rewards import (
    clip_advantages,
    combine_advantages,
    gdpo_normalize,
    group_advantages,
    normalized_advantages,
    preferences_from_scores,
    win_rates,
)


def random_preferences(rng, n, g):
    """Antisymmetric soft preferences: P + P^T = 1 off the diagonal."""
    upper = rng.uniform(size=(n, g, g))
    P = np.triu(upper, 1)
    P = P + np.transpose(1.0 - np.triu(upper, 1), (0, 2, 1)) * np.tril(np.ones((g, g)), -1)
    P[:, np.arange(g), np.arange(g)] = 0.5
    return P


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), g=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_win_rates_sum_to_half_group(n, g, seed):
    P = random_preferences(np.random.default_rng(seed), n, g)
    np.testing.assert_allclose(P + np.transpose(P, (0, 2, 1)), 1.0, atol=1e-12)
    w = np.asarray(win_rates(jnp.asarray(P)))
    assert w.shape == (n, g)
    np.testing.assert_allclose(w.sum(axis=1), g / 2, rtol=1e-5)
    manual = np.array([[np.mean([P[b, i, j] for j in range(g) if j != i]) for i in range(g)] for b in range(n)])
    np.testing.assert_allclose(w, manual, rtol=1e-5)


def test_all_ties_give_zero_advantage_without_nan():
    P = jnp.full((2, 8, 8), 0.5)
    adv = group_advantages(win_rates(P))
    assert np.all(np.isfinite(adv))
    np.testing.assert_array_equal(np.asarray(adv), 0.0)


def test_dominant_image_gets_largest_advantage():
    rng = np.random.default_rng(0)
    P = random_preferences(rng, 1, 6)
    P[0, 3, :] = 1.0
    P[0, :, 3] = 0.0
    P[0, 3, 3] = 0.5
    adv = np.asarray(group_advantages(win_rates(jnp.asarray(P))))
    assert np.argmax(adv[0]) == 3
    assert np.asarray(win_rates(jnp.asarray(P)))[0, 3] == pytest.approx(1.0)


def test_paper_illustration_of_illusory_advantage():
    # MISSION.md: HPS scores and win rates from the paper's figure; the paper's
    # numbers use the population std (ddof=0).
    hps = jnp.array([[0.3457, 0.3530, 0.3496, 0.3494]])
    adv = np.asarray(group_advantages(hps, ddof=0))[0]
    np.testing.assert_allclose(adv, [-1.44, 1.39, 0.07, -0.01], atol=0.01)
    wins = jnp.array([[0.0, 2 / 3, 1.0, 1 / 3]])
    adv = np.asarray(group_advantages(wins, ddof=0))[0]
    np.testing.assert_allclose(adv, [-1.34, 0.45, 1.34, -0.45], atol=0.01)


def test_group_advantages_ddof_matches_numpy():
    r = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    for ddof in (0, 1):
        expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=ddof, keepdims=True) + 1e-8)
        np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r), ddof=ddof)), expected, rtol=1e-5, atol=1e-6)


def test_preferences_from_scores_and_mixing():
    scores = jnp.array([[0.1, 0.3, 0.3, 0.9]])
    P = np.asarray(preferences_from_scores(scores))
    np.testing.assert_array_equal(P[0, 1], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(P + P.transpose(0, 2, 1), 1.0)
    w = np.asarray(win_rates(jnp.asarray(P)))
    np.testing.assert_allclose(w[0], [0.0, 0.5, 0.5, 1.0])
    # Hand-computed mix (reference weights 0.7 pairwise + 1.4 CLIP).
    a_pair = group_advantages(jnp.asarray(w))
    a_clip = group_advantages(scores)
    mixed = np.asarray(combine_advantages({"pair": a_pair, "clip": a_clip}, {"pair": 0.7, "clip": 1.4}))
    std_w = np.std([0, 0.5, 0.5, 1.0], ddof=1)
    expected_pair = (np.array([0, 0.5, 0.5, 1.0]) - 0.5) / (std_w + 1e-8)
    s = np.array([0.1, 0.3, 0.3, 0.9])
    expected_clip = (s - s.mean()) / (s.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(mixed[0], 0.7 * expected_pair + 1.4 * expected_clip, rtol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        combine_advantages({"pair": a_pair}, {"clip": 1.0})


def test_clip_advantages():
    adv = jnp.array([[-7.0, -1.0, 2.0, 9.0]])
    np.testing.assert_array_equal(np.asarray(clip_advantages(adv, 5.0)), [[-5.0, -1.0, 2.0, 5.0]])
    with pytest.raises(ValueError):
        clip_advantages(adv, 0.0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="G >= 2"):
        win_rates(jnp.zeros((1, 1, 1)))
    with pytest.raises(ValueError, match="too small"):
        group_advantages(jnp.zeros((2, 1)))


def test_normalisation_modes_match_numpy():
    r = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    r[1] = 0.25 + 1e-4 * r[1]  # a near-tied group: tiny group std
    glob = (r - r.mean(axis=1, keepdims=True)) / (r.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(normalized_advantages(jnp.asarray(r), "group_global_std"), glob, rtol=1e-5, atol=1e-6)
    batch = (r - r.mean()) / (r.std(ddof=0) + 1e-8)
    np.testing.assert_allclose(normalized_advantages(jnp.asarray(r), "batch", ddof=0), batch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normalized_advantages(jnp.asarray(r), "group"), group_advantages(jnp.asarray(r)))
    # The near-tied group: amplified to unit scale per group, damped with the global std.
    assert np.abs(np.asarray(group_advantages(jnp.asarray(r)))[1]).max() > 0.5
    assert np.abs(glob[1]).max() < 1e-3
    with pytest.raises(ValueError, match="group_global_std"):
        normalized_advantages(jnp.asarray(r), "prompt")


def test_gdpo_renormalises_over_the_batch():
    a = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32) * 3.0 + 1.0
    want = (a - a.mean()) / (a.std(ddof=1) + 1e-8)
    got = np.asarray(gdpo_normalize(jnp.asarray(a)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert abs(got.mean()) < 1e-6 and got.std(ddof=1) == pytest.approx(1.0, rel=1e-5)
