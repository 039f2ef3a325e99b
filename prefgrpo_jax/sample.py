"""``--mode=sample``: images for prompts from the latest checkpoint (or base weights).

Only the transformer's params are restored (no optimizer state), in
``config.model.dtype``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image

from prefgrpo_jax import config as config_lib, workdir_lock
from prefgrpo_jax.state import load_trained_pipeline
from prefgrpo_jax.train_logging import save_image_grid


def sample(config: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str | Path) -> Path:
    """Writes ``workdir/samples/step_<k>/`` PNGs (one per image) and a grid."""
    config = config_lib.build(config, mode="sample")
    s = config.sample
    prompts = list(s.prompts)
    workdir_lock.prepare_workdir(workdir)  # a read-only workdir fails now, not after sampling
    pipe, step = load_trained_pipeline(config, workdir)
    out = Path(workdir) / "samples" / (f"step_{step:06d}" if step is not None else "base")
    key = jax.random.key(config.seed)
    rows = []
    for i in range(s.images_per_prompt):
        images = pipe(
            prompts, height=config.train.height, width=config.train.width,
            num_inference_steps=s.num_steps, guidance_scale=config.train.guidance_scale,
            key=jax.random.fold_in(key, i),
        )
        rows.append(np.asarray(images))
    grid = np.stack(rows, axis=1)  # [N, images_per_prompt, H, W, 3]
    out.mkdir(parents=True, exist_ok=True)
    for n, prompt in enumerate(prompts):
        for j in range(grid.shape[1]):
            Image.fromarray((grid[n, j] * 255).round().astype(np.uint8)).save(out / f"{n:03d}_{j:02d}.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    save_image_grid(out / "grid.png", grid, prompts)
    print(f"wrote {grid.shape[0] * grid.shape[1]} images for {len(prompts)} prompts to {out}", flush=True)
    return out
