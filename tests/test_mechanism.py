"""The mechanism metrics of the toy-world study on constructed inputs with known answers."""

import numpy as np
import pytest

from prefgrpo_jax.rewards.advantages import normalized_advantages, win_rates
from prefgrpo_jax.toyworld.mechanism import advantage_correlation, amplification, noise_share

# The paper's illustration: HPS scores of one group and the win rates of the same images.
HPS = np.array([[0.3457, 0.3530, 0.3496, 0.3494]])
WIN = np.array([[0.0, 2 / 3, 1.0, 1 / 3]])


def _adv(r):
    # population std (ddof 0): the paper's example numbers come out with it
    return np.asarray(normalized_advantages(np.float32(r), "group", ddof=0), np.float64)


def test_amplification_reproduces_the_paper_example():
    a = _adv(HPS)
    np.testing.assert_allclose(a, [[-1.44, 1.39, 0.07, -0.01]], atol=0.01)  # the paper's numbers
    assert amplification(a, HPS) == pytest.approx((a.max() - a.min()) / 0.0073, rel=1e-4)
    assert amplification(a, HPS) == pytest.approx(388, abs=2)
    aw = _adv(WIN)
    assert amplification(aw, WIN) == pytest.approx(2.68, abs=0.01)  # spread 2.68 over [0, 1]
    # a group of equal rewards has no spread to amplify and is skipped
    assert amplification(np.vstack([a, np.zeros((1, 4))]), np.vstack([HPS, np.full((1, 4), 0.3)])) \
        == pytest.approx(amplification(a, HPS))


def test_advantage_correlation():
    ref = np.array([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    assert advantage_correlation(ref, ref) == pytest.approx(1.0)
    assert advantage_correlation(-ref, ref) == pytest.approx(-1.0)
    assert advantage_correlation(2 * ref + 0, ref) == pytest.approx(1.0)
    # orthogonal within the pooled set: [1, -2, 1] against [-1, 0, 1]
    assert advantage_correlation(np.array([[1.0, -2.0, 1.0]]), ref[:1]) == pytest.approx(0.0, abs=1e-12)
    # a group where the reference is flat is left out, whatever the advantages there
    flat = np.vstack([ref[:1], [[5.0, -5.0, 0.0]]])
    assert advantage_correlation(flat, np.vstack([ref[:1], np.zeros((1, 3))])) == pytest.approx(1.0)
    assert np.isnan(advantage_correlation(ref, np.zeros_like(ref)))


def test_noise_share():
    v = np.array([[0.0, 0.0, 1.0, 1.0]])  # two verifier-equal pairs
    # advantages that only separate the verifier's classes: no noise
    assert noise_share(np.array([[-1.0, -1.0, 1.0, 1.0]]), v) == pytest.approx(0.0)
    # advantages that only separate images the verifier ties: all noise
    assert noise_share(np.array([[-1.0, 1.0, -1.0, 1.0]]), v) == pytest.approx(1.0)
    # half and half: class means -1, +1 (SS 4); within +-1 around them (SS 4) -> 0.5
    assert noise_share(np.array([[-2.0, 0.0, 0.0, 2.0]]), v) == pytest.approx(0.5)
    # a verifier that separates every image leaves nothing provably noise
    assert noise_share(np.array([[3.0, -1.0, 0.5, 0.1]]), np.array([[0.1, 0.2, 0.3, 0.4]])) == 0.0
    # the paper's case: a score reward on images the verifier ties is all noise,
    # and so are win rates on them
    ties = np.full((1, 4), 0.5)
    assert noise_share(_adv(HPS), ties) == pytest.approx(1.0)
    assert noise_share(_adv(WIN), ties) == pytest.approx(1.0)


def test_win_rate_advantages_of_a_perfect_judge_have_no_noise():
    v = np.array([[0.2, 0.2, 0.6, 1.0, 0.6]])
    P = np.where(v[:, :, None] > v[:, None, :], 1.0, np.where(v[:, :, None] < v[:, None, :], 0.0, 0.5))
    a = _adv(np.asarray(win_rates(np.float32(P))))
    assert noise_share(a, v) == pytest.approx(0.0, abs=1e-10)
    assert advantage_correlation(a, _adv(v)) > 0.95
