"""Pref-GRPO on FLUX.1-dev (the paper's recipe; MISSION.md lists the values).

  python -m prefgrpo_jax.main --config=configs/flux.py \
      --config.model.path=/data/FLUX.1-dev --config.data.prompts=/data/prompts.txt \
      --workdir=/ckpt/prefgrpo_flux

Reward: the UnifiedReward-Think judge served by vLLM (OpenAI-compatible API);
set the endpoint with --config.reward.options.vlm_judge.base_url=http://HOST:PORT.
For the newer mixed recipe use --config.reward.spec='{"vlm_judge": 0.4, "clip": 0.6}'
and --config.reward.options.clip.path=/data/CLIP-ViT-H-14.
"""

import ml_collections

from prefgrpo_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.path = "/path/to/FLUX.1-dev"
    c.data.prompts = "/path/to/prompts.txt"
    c.reward.spec = {"vlm_judge": 1.0}
    c.reward.options = ml_collections.ConfigDict({
        "vlm_judge": {
            "base_url": "http://127.0.0.1:8080",
            "model": "UnifiedReward-Think-qwen-7b",
            "api_key_env": "",  # name of the env var holding the key; "" = none (a str, so settable from the command line)
            "max_concurrency": 32,
            "timeout_s": 120.0,
            "retries": 3,
            "debias": False,
        },
    })
    # --mode=eval: UniGenBench-style testpoints judged by a VLM behind an
    # OpenAI-compatible server (e.g. a Qwen2.5-VL eval model served by vLLM).
    c.eval.judge = "vlm_judge"
    c.eval.prompts = "/path/to/unigenbench_testpoints.jsonl"
    c.eval.vlm_judge.model = "Qwen2.5-VL-72B-Instruct"  # the name the server serves
    c.eval.num_steps = 28
    c.eval.batch_size = 8
    # 64 GPUs / TPU chips: batch over data x fsdp; parameters and Adam moments FSDP-sharded.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
