"""Pref-GRPO on FLUX.1-dev: the paper-era recipe.

Follows CodeGoat24/Pref-GRPO ``fastvideo/train_flux_pref_grpo.py`` at commit
c06662d: the advantage is ``0.7 x`` the group-normalised UnifiedReward-Think win
rate plus ``1.4 x`` the group-normalised CLIP score, the plain PPO ratio (no
rationorm), no GDPO, 2 optimizer steps per rollout. Everything else is as in
configs/flux.py (the current recipe), which this file starts from.

  python -m prefgrpo_jax.main --config=configs/flux_paper.py \
      --config.model.path=/data/FLUX.1-dev --config.data.prompts=/data/prompts.txt \
      --config.reward.options.clip.path=/data/CLIP-ViT-H-14 --workdir=/ckpt/prefgrpo_flux_paper
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("flux", Path(__file__).with_name("flux.py"))
    flux = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flux)
    c = flux.get_config()
    c.reward.spec = {"vlm_judge": 0.7, "clip": 1.4}
    c.reward.gdpo = False
    c.train.rationorm = False
    return c
