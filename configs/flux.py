"""Pref-GRPO on FLUX.1-dev: the current official recipe.

Follows CodeGoat24/Pref-GRPO HEAD (``scripts/full_train/finetune_prefgrpo_flux.sh``
at 95dae22 with ``scripts/_common_finetune.sh`` at 23d75cb, run by
``fastvideo/train_flux.py``): reward ``{"unifiedreward_think": 0.4, "clip": 0.6}``,
``--rationorm``, 8 images per prompt on each rank with gradient accumulation 4
(2 optimizer steps per rollout), lr 1e-5 constant, clip range 1e-4, 25 steps,
eta 0.7, shift 3, the last step's x0-prediction judged. The paper-era recipe is
configs/flux_paper.py.

  python -m prefgrpo_jax.main --config=configs/flux.py \
      --config.model.path=/data/FLUX.1-dev \
      --config.data.prompts=/data/UniGenBench/data/train_prompt.txt \
      --config.reward.options.clip.path=/data/CLIP-ViT-H-14 \
      --workdir=/ckpt/prefgrpo_flux

Training prompts: the paper trains on UniGenBench's 10,000 training prompts,
``data/train_prompt.txt`` of a clone of https://github.com/CodeGoat24/UniGenBench
(one prompt per line). The same clone is the eval set: ``--mode=eval`` with
``--config.eval.unigenbench_dir=/data/UniGenBench`` runs the benchmark with its
official protocol and judge prompt (prefgrpo_jax/unigenbench.py).

The judge is UnifiedReward-Think served by vLLM as the reference's script serves
it (``--served-model-name UnifiedReward``); set the endpoint with
--config.reward.options.vlm_judge.base_url=http://HOST:PORT. README "Judge
servers" has the vLLM commands for both judges, and
``python -m prefgrpo_jax.judge_check --config=configs/flux.py ...`` checks them.
The model was trained on its own prompt template: put the official text in a
file and pass
--config.reward.options.vlm_judge.prompt_template_file=/path/to/template.txt
(this project ships its own paraphrase as the default, not the official text).
"""

import ml_collections

from prefgrpo_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.path = "/path/to/FLUX.1-dev"
    c.model.compute_dtype = "bfloat16"  # autocast on fp32 master weights, as the reference
    c.model.attention = "auto"  # cuDNN flash attention on GPU, Pallas splash on TPU
    c.data.prompts = "/path/to/UniGenBench/data/train_prompt.txt"  # the paper's training prompts
    # base_config() holds this recipe's training values: updates_per_rollout 2,
    # rationorm, adv_norm group, reward_image x0_pred. GDPO (--apply_gdpo) is
    # commented out in the reference's _common_finetune.sh, hence off here.
    # The reference's batch: one prompt x 8 images per device (rank), each
    # update's samples trained one per device at a time; valid on any pod.
    c.train.prompts_per_device = 1
    c.train.micro_batches = 0
    c.reward.spec = {"vlm_judge": 0.4, "clip": 0.6}
    c.reward.gdpo = False
    # Logged as reward_mean: the CLIP score moves with the model; a win rate
    # averages 0.5 by construction.
    c.reward.monitor = "clip"
    c.reward.options = ml_collections.ConfigDict({
        "vlm_judge": {
            "base_url": "http://127.0.0.1:8080",
            "model": "UnifiedReward",  # the name the reference's vLLM script serves
            "api_key_env": "",  # name of the env var holding the key; "" = none (a str, so settable from the command line)
            "max_concurrency": 32,
            "timeout_s": 120.0,
            "retries": 3,
            "debias": False,
            "max_tokens": 4096,
            "image_format": "jpeg",  # quality 95, as the reference sends
            "prompt_template_file": None,  # None: the project's own template
        },
        "clip": {"path": "/path/to/CLIP-ViT-H-14"},  # transformers CLIPModel directory (laion ViT-H-14)
    })
    # --mode=eval: UniGenBench with its official protocol (eval.unigenbench.*) and judge,
    # UniGenBench-EvalModel-qwen3vl-32b-v1 served by vLLM as "QwenVL" (the official
    # client's name); replies are long (analysis per testpoint): max_tokens as official.
    c.eval.judge = "unigenbench"
    c.eval.unigenbench_dir = "/path/to/UniGenBench"
    c.eval.vlm_judge.base_url = "http://127.0.0.1:8081"
    c.eval.vlm_judge.model = "QwenVL"
    c.eval.vlm_judge.max_tokens = 4096
    c.eval.vlm_judge.max_concurrency = 16
    c.eval.num_steps = 28
    c.eval.batch_size = 8
    # 64 GPUs / TPU chips: batch over data x fsdp; parameters and Adam moments FSDP-sharded.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
