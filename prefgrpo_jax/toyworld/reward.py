"""The toy world's verifier as reward backends of the registry.

``verifier``: pointwise score (fraction of the prompt's testpoints satisfied).
``verifier_pairwise``: hard pairwise outcomes from the same scores (win 1, loss 0,
equal scores tie 0.5), i.e. Pref-GRPO's win-rate reward with a perfect judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefgrpo_jax.rewards import registry
from prefgrpo_jax.rewards.advantages import preferences_from_scores
from prefgrpo_jax.toyworld.verify import verify_batch


def verifier_scores(prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
    """Prompts ``[N]`` and images ``[N, G, H, W, 3]`` in [0, 1] -> scores ``[N, G]``."""
    images = np.asarray(images, np.float32)
    n, g = images.shape[:2]
    flat_prompts = [p for p in prompts for _ in range(g)]
    return np.asarray(verify_batch(images.reshape(n * g, *images.shape[2:]), flat_prompts)).reshape(n, g)


def _pointwise_factory(name: str = "verifier") -> registry.RewardSource:
    return registry.pointwise_source(name, verifier_scores)


def _pairwise_factory(name: str = "verifier_pairwise") -> registry.RewardSource:
    return registry.pairwise_source(
        name, lambda prompts, images: np.asarray(preferences_from_scores(verifier_scores(prompts, images)))
    )


for _name, _factory in (("verifier", _pointwise_factory), ("verifier_pairwise", _pairwise_factory)):
    if _name not in registry.known_rewards():
        registry.register_reward(_name, _factory)
