"""Rewards: win rates and group advantages, pairwise/pointwise reward sources."""

from prefgrpo_jax.rewards.advantages import (
    clip_advantages,
    combine_advantages,
    group_advantages,
    preferences_from_scores,
    win_rates,
)

__all__ = [
    "clip_advantages",
    "combine_advantages",
    "group_advantages",
    "preferences_from_scores",
    "win_rates",
]
