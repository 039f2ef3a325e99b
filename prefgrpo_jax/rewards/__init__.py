"""Rewards: win rates and group advantages, pairwise/pointwise reward sources."""

from prefgrpo_jax.rewards.advantages import (
    ADV_NORMS,
    clip_advantages,
    combine_advantages,
    gdpo_normalize,
    group_advantages,
    normalized_advantages,
    preferences_from_scores,
    win_rates,
)

__all__ = [
    "ADV_NORMS",
    "clip_advantages",
    "combine_advantages",
    "gdpo_normalize",
    "group_advantages",
    "normalized_advantages",
    "preferences_from_scores",
    "win_rates",
]

# Pairwise preference reward model (PPRM), its pointwise baseline, and the
# registry of named reward sources (see pairwise.py, registry.py).
from prefgrpo_jax.rewards.pairwise import (  # noqa: E402
    PairwiseRewardModel,
    PointwiseRewardModel,
    RewardModelConfig,
    build_reward_model,
    load_reward_model,
    save_reward_model,
    split_reward_model,
)
from prefgrpo_jax.rewards.registry import (  # noqa: E402
    RewardMix,
    RewardSource,
    build_reward_mix,
    register_reward,
)

__all__ += [
    "PairwiseRewardModel",
    "PointwiseRewardModel",
    "RewardMix",
    "RewardModelConfig",
    "RewardSource",
    "build_reward_mix",
    "build_reward_model",
    "load_reward_model",
    "register_reward",
    "save_reward_model",
    "split_reward_model",
]
