"""One FLUX velocity evaluated by our model and by diffusers' on the same inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def velocity_inputs(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """fp32 inputs for a batch of 2 (4x4 packed latents, 6 text tokens); ids unbatched."""
    rng = np.random.default_rng(seed)
    b, hh, ww, t = 2, 4, 4, 6
    rows, cols = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
    return {
        "img": rng.standard_normal((b, hh * ww, cfg.in_channels)).astype(np.float32),
        "img_ids": np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(np.float32),
        "txt": rng.standard_normal((b, t, cfg.context_dim)).astype(np.float32),
        "txt_ids": np.zeros((t, 3), np.float32),
        "timesteps": np.array([0.3, 0.9], np.float32),
        "y": rng.standard_normal((b, cfg.vec_dim)).astype(np.float32),
        "guidance": np.array([3.5, 1.0], np.float32),
    }


def jax_velocity(model, x: dict[str, np.ndarray]) -> np.ndarray:
    """Our ``FluxTransformer`` (BFL call convention) on ``velocity_inputs``."""
    b, length, _ = x["img"].shape
    t = x["txt"].shape[1]
    return np.asarray(model(
        jnp.asarray(x["img"]), jnp.broadcast_to(x["img_ids"], (b, length, 3)), jnp.asarray(x["txt"]),
        jnp.broadcast_to(x["txt_ids"], (b, t, 3)), jnp.asarray(x["timesteps"]), jnp.asarray(x["y"]),
        jnp.asarray(x["guidance"])))


def torch_velocity(torch_model, x: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' ``FluxTransformer2DModel`` on ``velocity_inputs``."""
    import torch

    tx = {k: torch.from_numpy(a) for k, a in x.items()}
    with torch.no_grad():
        return torch_model(
            hidden_states=tx["img"], encoder_hidden_states=tx["txt"], pooled_projections=tx["y"],
            timestep=tx["timesteps"], img_ids=tx["img_ids"], txt_ids=tx["txt_ids"],
            guidance=tx["guidance"], return_dict=False,
        )[0].numpy()
