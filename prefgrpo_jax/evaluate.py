"""``--mode=eval``: per-dimension scores of a checkpoint on a held-out prompt set.

Like UniGenBench, every prompt has binary testpoints; a prompt's score is the
fraction it passes, a dimension's score the mean over its prompts, and the
overall score the unweighted mean over dimensions. The judge here is the toy
world's pixel verifier (``eval.judge = "toy_verifier"``), which reads the
testpoints from the prompt itself.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from prefgrpo_jax.sample import load_trained_pipeline
from prefgrpo_jax.train_logging import save_image_grid

log = logging.getLogger(__name__)
JUDGES = ("toy_verifier",)


def heldout_set(config: ml_collections.ConfigDict) -> list[Any]:
    from prefgrpo_jax.toyworld.scenes import heldout_prompts

    return heldout_prompts(n_per_dim=int(config.eval.prompts_per_dimension))


def generate(pipe, prompts: list[str], config: ml_collections.ConfigDict, key: jax.Array) -> np.ndarray:
    """Images ``[len(prompts), H, W, 3]`` with the deterministic sampler, in fixed-size batches."""
    e, t = config.eval, config.train
    batch = int(e.batch_size)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape
        images = pipe(
            padded, height=t.height, width=t.width, num_inference_steps=int(e.num_steps),
            guidance_scale=t.get("guidance_scale"), key=jax.random.fold_in(key, start),
        )
        out.append(np.asarray(images)[: len(chunk)])
    return np.concatenate(out)


def score_table_markdown(table: dict[str, float], title: str) -> str:
    dims = [d for d in table if d != "overall"]
    header = "| " + " | ".join(["model"] + dims + ["overall"]) + " |"
    sep = "|" + "---|" * (len(dims) + 2)
    row = "| " + " | ".join([title] + [f"{100 * table[d]:.2f}" for d in dims] + [f"{100 * table['overall']:.2f}"]) + " |"
    return "\n".join([header, sep, row])


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Scores the latest checkpoint of ``workdir`` (or the base weights) and writes reports."""
    if config.eval.judge not in JUDGES:
        raise ValueError(f"config.eval.judge={config.eval.judge!r}: must be one of {JUDGES}")
    from prefgrpo_jax.toyworld.verify import score_table, verify

    t0 = time.perf_counter()
    pipe, step = load_trained_pipeline(config, workdir)
    specs = heldout_set(config)
    prompts = [s.text for s in specs] * int(config.eval.images_per_prompt)
    all_specs = specs * int(config.eval.images_per_prompt)
    images = generate(pipe, prompts, config, jax.random.key(int(config.eval.seed)))
    results = [verify(img, spec) for img, spec in zip(images, all_specs)]
    table = score_table(results, all_specs)
    name = f"step_{step:06d}" if step is not None else "base"
    report = {
        "checkpoint_step": step,
        "model_path": str(config.model.path),
        "judge": config.eval.judge,
        "prompts": len(specs),
        "images": len(prompts),
        "num_steps": int(config.eval.num_steps),
        "scores": table,
        "wall_s": time.perf_counter() - t0,
    }
    out_dir = Path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = score_table_markdown(table, name)
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    first = np.arange(0, len(specs), max(1, len(specs) // 8))[:8]
    save_image_grid(out_dir / f"{name}.png", images[first][:, None], [specs[i].text for i in first])
    print(markdown, flush=True)
    print(f"({len(prompts)} images, {report['wall_s']:.1f} s; report in {out_dir})", flush=True)
    return report
