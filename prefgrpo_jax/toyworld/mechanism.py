"""The illusory-advantage mechanism, measured on one rollout against the verifier.

All functions take one batch of groups: a reward's normalised advantages
``adv [N, G]`` (or raw rewards ``r [N, G]``) and the verifier's scores or
advantages on the same images ``[N, G]``; they return Python floats (NaN when
nothing is measurable). fp64 throughout: these are statistics, not training math.

* :func:`advantage_correlation`: Pearson correlation, pooled over groups, between a
  reward's advantages and the verifier's. 1 = the reward pushes the policy exactly
  where the truth would; 0 = its push is unrelated to the truth.
* :func:`noise_share`: the share of a reward's advantage variance that lies
  *within* sets of images the verifier scores equally. Images the verifier cannot
  tell apart have no real advantage over each other, so any advantage between
  them is noise (illusory). It is a lower bound on the noise share: errors
  between images the verifier does separate are not counted.
* :func:`amplification`: the paper's illusory-advantage statistic, score
  differences vs normalised advantages: per group, the spread (max - min) of the
  normalised advantages over the spread of the raw rewards, averaged. The
  paper's HPS example has scores within 0.0073 turned into advantages 2.83 apart:
  an amplification of ~390; win rates in [0, 1] amplify ~2.7.
"""

from __future__ import annotations

import numpy as np

__all__ = ["advantage_correlation", "amplification", "noise_share"]


def advantage_correlation(adv: np.ndarray, ref_adv: np.ndarray) -> float:
    """Pooled Pearson correlation of ``adv [N, G]`` and ``ref_adv [N, G]``.

    Groups where either side is constant (all advantages 0: no signal to agree
    with) are left out, so they neither help nor hurt.
    """
    a, b = np.asarray(adv, np.float64), np.asarray(ref_adv, np.float64)
    keep = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
    if not keep.any():
        return float("nan")
    a, b = a[keep].ravel(), b[keep].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def noise_share(adv: np.ndarray, verifier: np.ndarray) -> float:
    """Share of ``adv [N, G]``'s within-group sum of squares inside verifier-equal sets.

    Per group, images are split by their verifier score (``verifier [N, G]``); the
    sum over sets of squared deviations of ``adv`` from the set's mean, over the
    total sum of squared deviations from the group's mean, pooled over groups.
    """
    a, v = np.asarray(adv, np.float64), np.asarray(verifier, np.float64)
    within = total = 0.0
    for a_g, v_g in zip(a, v):
        total += float(np.sum((a_g - a_g.mean()) ** 2))
        for level in np.unique(v_g):
            members = a_g[v_g == level]
            within += float(np.sum((members - members.mean()) ** 2))
    return within / total if total > 0 else float("nan")


def amplification(adv: np.ndarray, reward: np.ndarray) -> float:
    """Mean over groups of ``ptp(adv) / ptp(reward)`` (``[N, G]`` each); groups with equal rewards skipped."""
    a, r = np.asarray(adv, np.float64), np.asarray(reward, np.float64)
    spread_r, spread_a = np.ptp(r, axis=1), np.ptp(a, axis=1)
    keep = spread_r > 0
    return float(np.mean(spread_a[keep] / spread_r[keep])) if keep.any() else float("nan")
