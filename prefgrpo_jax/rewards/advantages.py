"""Win rates and group-relative advantages (pure jnp, fp32).

Pref-GRPO's reward for image i of a group is its win rate against the other
G-1 images; advantages are group-normalised rewards. Pointwise (score) rewards
use the same normalisation, which is exactly where the "illusory advantage"
comes from: a tiny group std blows up noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax.numpy as jnp


def win_rates(P: chex.Array) -> chex.Array:
    """Win rate of each image against the rest of its group.

    Args:
      P: ``[N, G, G]``; ``P[n, i, j]`` is the probability (or 0 / 0.5 / 1
        outcome) that image i beats image j. The diagonal is ignored.

    Returns:
      ``[N, G]`` fp32, ``w_i = mean_{j != i} P[i, j]``. When ``P + P^T = 1``
      off the diagonal, each group's rates sum to G/2.
    """
    chex.assert_rank(P, 3)
    n, g, g2 = P.shape
    if g != g2 or g < 2:
        raise ValueError(f"preference matrix must be [N, G, G] with G >= 2, got {P.shape}")
    P = P.astype(jnp.float32)
    off_diagonal = 1.0 - jnp.eye(g, dtype=jnp.float32)
    return jnp.sum(P * off_diagonal, axis=-1) / (g - 1)


def group_advantages(r: chex.Array, *, ddof: int = 1, eps: float = 1e-8) -> chex.Array:
    """Group-normalised advantages ``(r - mean_G r) / (std_G r + eps)``.

    Args:
      r: ``[N, G]`` rewards (win rates or pointwise scores).
      ddof: 1 (default) matches the reference (PyTorch's ``Tensor.std``);
        0 is the population std that the paper's worked example uses.
      eps: keeps all-equal groups (all ties) at advantage 0 instead of NaN.

    Returns:
      ``[N, G]`` fp32.
    """
    chex.assert_rank(r, 2)
    if r.shape[1] <= ddof:
        raise ValueError(f"group size {r.shape[1]} too small for ddof={ddof}")
    r = r.astype(jnp.float32)
    mean = jnp.mean(r, axis=1, keepdims=True)
    std = jnp.std(r, axis=1, keepdims=True, ddof=ddof)
    return (r - mean) / (std + eps)


ADV_NORMS = ("group", "group_global_std", "batch")


def normalized_advantages(
    r: chex.Array, mode: str = "group", *, ddof: int = 1, eps: float = 1e-8
) -> chex.Array:
    """Rewards ``[N, G]`` -> advantages ``[N, G]`` (fp32), by ``mode``:

    * ``group``: ``(r - mean_G) / (std_G + eps)`` (Pref-GRPO ``--use_group``);
    * ``group_global_std``: ``(r - mean_G) / (std over all N G + eps)``, the
      per-prompt mean with a batch-wide std (Flow-GRPO's ``global_std``): a
      group whose images all score alike gets small advantages instead of
      amplified noise;
    * ``batch``: ``(r - mean) / (std + eps)`` over all N G images (Pref-GRPO
      without ``--use_group``).

    ``r`` must hold the global batch: the std and mean are over what is given.
    """
    chex.assert_rank(r, 2)
    if mode == "group":
        return group_advantages(r, ddof=ddof, eps=eps)
    r = r.astype(jnp.float32)
    if r.size <= ddof:
        raise ValueError(f"{r.size} rewards too few for ddof={ddof}")
    std = jnp.std(r, ddof=ddof)
    if mode == "group_global_std":
        return (r - jnp.mean(r, axis=1, keepdims=True)) / (std + eps)
    if mode == "batch":
        return (r - jnp.mean(r)) / (std + eps)
    raise ValueError(f"unknown advantage normalisation {mode!r}; expected one of {ADV_NORMS}")


def gdpo_normalize(adv: chex.Array, eps: float = 1e-8) -> chex.Array:
    """GDPO (Pref-GRPO HEAD ``compute_weighted_advantages(apply_gdpo=True)``):
    the weighted sum of per-source advantages renormalised over the whole
    batch, ``(a - mean) / (unbiased std + eps)``, so the mix has unit scale
    whatever the weights and the correlation of the sources."""
    adv = adv.astype(jnp.float32)
    return (adv - jnp.mean(adv)) / (jnp.std(adv, ddof=1) + eps)


def clip_advantages(adv: chex.Array, max_abs: float | None) -> chex.Array:
    """Clips advantages to ``[-max_abs, max_abs]`` (no-op for None)."""
    if max_abs is None:
        return adv
    if max_abs <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {max_abs}")
    return jnp.clip(adv, -max_abs, max_abs)


def combine_advantages(
    advantages: Mapping[str, chex.Array], weights: Mapping[str, float]
) -> chex.Array:
    """Weighted sum of per-source advantages (the reference mixes judge + CLIP).

    Args:
      advantages: source name -> ``[N, G]`` group-normalised advantages.
      weights: source name -> weight; must name exactly the same sources.
    """
    if set(advantages) != set(weights) or not advantages:
        raise ValueError(
            f"reward sources {sorted(advantages)} and weights {sorted(weights)} differ"
        )
    names = sorted(advantages)
    chex.assert_equal_shape([advantages[k] for k in names])
    return sum(weights[k] * advantages[k].astype(jnp.float32) for k in names)


def preferences_from_scores(scores: chex.Array, *, tie_tol: float = 0.0) -> chex.Array:
    """Hard pairwise outcomes from scalar scores: 1 win, 0 loss, 0.5 tie.

    Args:
      scores: ``[N, G]``.
      tie_tol: differences with ``|s_i - s_j| <= tie_tol`` count as ties.

    Returns:
      ``[N, G, G]`` fp32 with ``P + P^T = 1`` and 0.5 on the diagonal.
    """
    chex.assert_rank(scores, 2)
    diff = scores[:, :, None].astype(jnp.float32) - scores[:, None, :].astype(jnp.float32)
    return jnp.where(diff > tie_tol, 1.0, jnp.where(diff < -tie_tol, 0.0, 0.5))
