"""Pref-GRPO on FLUX.1-dev (the paper's recipe; MISSION.md lists the values).

  python -m prefgrpo_jax.main --config=configs/flux.py \
      --config.model.path=/data/FLUX.1-dev \
      --config.data.prompts=/data/UniGenBench/data/train_prompt.txt \
      --workdir=/ckpt/prefgrpo_flux

Training prompts: the paper trains on UniGenBench's 10,000 training prompts,
``data/train_prompt.txt`` of a clone of https://github.com/CodeGoat24/UniGenBench
(one prompt per line). The same clone is the eval set: ``--mode=eval`` with
``--config.eval.unigenbench_dir=/data/UniGenBench`` runs the benchmark with its
official protocol and judge prompt (prefgrpo_jax/unigenbench.py).

Reward: the UnifiedReward-Think judge served by vLLM (OpenAI-compatible API);
set the endpoint with --config.reward.options.vlm_judge.base_url=http://HOST:PORT.
README "Judge servers" has the vLLM commands for both judges, and
``python -m prefgrpo_jax.judge_check --config=configs/flux.py ...`` checks them.
For the newer mixed recipe use --config.reward.spec='{"vlm_judge": 0.4, "clip": 0.6}'
and --config.reward.options.clip.path=/data/CLIP-ViT-H-14.
"""

import ml_collections

from prefgrpo_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.path = "/path/to/FLUX.1-dev"
    c.model.compute_dtype = "bfloat16"  # autocast on fp32 master weights, as the reference
    c.data.prompts = "/path/to/UniGenBench/data/train_prompt.txt"  # the paper's training prompts
    c.reward.spec = {"vlm_judge": 1.0}
    c.reward.options = ml_collections.ConfigDict({
        "vlm_judge": {
            "base_url": "http://127.0.0.1:8080",
            "model": "UnifiedReward-Think-qwen-7b",
            "api_key_env": None,
            "max_concurrency": 32,
            "timeout_s": 120.0,
            "retries": 3,
            "debias": False,
        },
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
