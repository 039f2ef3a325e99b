"""Pref-GRPO on FLUX.1-dev with LoRA: the reference's LoRA recipe.

Follows CodeGoat24/Pref-GRPO ``scripts/lora/finetune_prefgrpo_flux_lora.sh``
(``--use_lora --lora_rank 64 --lora_alpha 128``, lr 1e-5): peft adapters with
``init_lora_weights=True`` on the attention projections of both streams and
both feed-forward nets of every double block (and, by peft's suffix match, the
single blocks' q/k/v), the base frozen in bf16, the KL reference (if
``train.kl_beta > 0``) the adapters switched off. Everything else, the reward mix
included, is configs/flux.py's current official recipe.

  python -m prefgrpo_jax.main --config=configs/flux_lora.py \
      --config.model.path=/data/FLUX.1-dev --config.data.prompts=/data/prompts.txt \
      --config.reward.options.clip.path=/data/CLIP-ViT-H-14 --workdir=/ckpt/prefgrpo_flux_lora

The run exports ``workdir/export/lora/pytorch_lora_weights.safetensors`` for
``diffusers.FluxPipeline.load_lora_weights``; ``--config.export.lora_merged=True``
also writes the merged transformer. Memory: README "LoRA" and
experiments/results/plan_flux1dev_lora.md.
"""

import importlib.util
from pathlib import Path

import ml_collections

from prefgrpo_jax import lora


def get_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("flux", Path(__file__).with_name("flux.py"))
    flux = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flux)
    c = flux.get_config()
    c.model.dtype = "bfloat16"  # the frozen base (and VAE, text encoders)
    c.model.lora.rank = 64
    c.model.lora.alpha = 128.0
    c.model.lora.targets = tuple(lora.REFERENCE_TARGETS)
    c.model.lora.init = "default"
    return c
