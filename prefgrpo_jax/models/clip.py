"""CLIP in Flax NNX: vision tower, full dual encoder, preprocessing and CLIP score.

The text tower and the transformer layer are those of ``models/text_encoders.py``
(``CLIPTextTransformer``, ``CLIPEncoderLayer``); this module adds the vision
tower and the projections of transformers' ``CLIPModel``, whose
``save_pretrained`` directories (config.json + safetensors) load with
``load_clip``.

Images are NHWC throughout (transformers takes NCHW ``pixel_values``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prefgrpo_jax import convert
from prefgrpo_jax.convert import SourceTensors, TensorMap, conv_kernel, linear_kernel, put
from prefgrpo_jax.models.text_encoders import (
    CLIPEncoderLayer,
    CLIPTextConfig,
    CLIPTextTransformer,
    config_subset,
    map_clip_encoder_layers,
    map_clip_text_into,
    map_layer_norm,
    read_hf_config,
    run_stacked,
    stacked,
)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CLIPConfig",
    "CLIPModel",
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "clip_score",
    "load_clip",
    "map_clip_hf",
    "preprocess_images",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP vision tower hyper-parameters (defaults: transformers 5's ``CLIPVisionConfig``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a ``CLIPVisionConfig`` dict, or a ``CLIPConfig`` dict (its ``vision_config``)."""
        if "vision_config" in config:
            config = config["vision_config"] or {}
        return cls(**config_subset(cls, config))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Full CLIP: text tower, vision tower, shared projection width."""

    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> CLIPConfig:
        """From a transformers ``CLIPConfig`` dict (``text_config`` / ``vision_config``)."""
        return cls(
            text=CLIPTextConfig.from_hf(config.get("text_config") or {}),
            vision=CLIPVisionConfig.from_hf(config.get("vision_config") or {}),
            projection_dim=config.get("projection_dim", 512),
        )


class CLIPVisionTransformer(nnx.Module):
    """CLIP ViT (transformers' ``CLIPVisionModel``), inference only.

    Patch conv (no bias) + class token + learned positions, ``pre_layrnorm``
    (transformers' spelling), the shared ``CLIPEncoderLayer`` stack, and
    ``post_layernorm`` applied to the class token (the pooled output).
    """

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
            use_bias=False, param_dtype=param_dtype, rngs=rngs,
        )
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (d,), param_dtype) * d**-0.5
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, d, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
        )
        ln = lambda: nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, param_dtype=param_dtype,
                                   rngs=rngs)
        self.pre_layrnorm = ln()
        self.layers = stacked(
            lambda r: CLIPEncoderLayer(
                d, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_act,
                cfg.layer_norm_eps, rngs=r, param_dtype=param_dtype,
            ),
            cfg.num_hidden_layers,
            rngs,
        )
        self.post_layernorm = ln()

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``pixel_values [B, S, S, C]`` normalised, S = ``image_size``
        -> ``(last_hidden_state [B, 1 + patches, D], pooled [B, D])``."""
        b, h, w, _ = pixel_values.shape
        if h != self.cfg.image_size or w != self.cfg.image_size:
            raise ValueError(
                f"Input image size ({h}*{w}) doesn't match model "
                f"({self.cfg.image_size}*{self.cfg.image_size}); use preprocess_images."
            )
        dtype = self.patch_embedding.kernel[...].dtype
        x = self.patch_embedding(pixel_values.astype(dtype))  # [B, h', w', D]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.embedding[...]
        x = self.pre_layrnorm(x)
        x = run_stacked(self.layers, x, None)
        return x, self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
    """transformers' ``CLIPModel``: both towers, projections (no bias), logit scale."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg.text, rngs=rngs, param_dtype=param_dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision, rngs=rngs, param_dtype=param_dtype)
        self.visual_projection = nnx.Linear(
            cfg.vision.hidden_size, cfg.projection_dim, use_bias=False,
            param_dtype=param_dtype, rngs=rngs,
        )
        self.text_projection = nnx.Linear(
            cfg.text.hidden_size, cfg.projection_dim, use_bias=False,
            param_dtype=param_dtype, rngs=rngs,
        )
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, param_dtype))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """``pixel_values [B, S, S, 3]`` (normalised, NHWC) -> ``[B, projection_dim]``
        (not normalised, like transformers' ``get_image_features``)."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """``input_ids [B, T]``, ``attention_mask [B, T]`` -> ``[B, projection_dim]``."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def __call__(
        self,
        pixel_values: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """``logits_per_image [B_img, B_txt]`` = exp(logit_scale) * cosine similarity."""
        img = _l2_normalize(self.get_image_features(pixel_values).astype(jnp.float32))
        txt = _l2_normalize(self.get_text_features(input_ids, attention_mask).astype(jnp.float32))
        return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * (img @ txt.T)


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_score(
    model: CLIPModel,
    pixel_values: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Cosine similarity of image i and text i, ``[B]`` fp32 (no logit scale).

    ``pixel_values [B, S, S, 3]`` normalised (see ``preprocess_images``);
    ``input_ids`` / ``attention_mask`` ``[B, T]``, row i describing image i.
    """
    img = _l2_normalize(model.get_image_features(pixel_values).astype(jnp.float32))
    txt = _l2_normalize(model.get_text_features(input_ids, attention_mask).astype(jnp.float32))
    return jnp.sum(img * txt, axis=-1)


def preprocess_images(
    images: jax.Array,
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
    """CLIP preprocessing in JAX (jit-able): ``[B, H, W, 3]`` in [0, 1] -> ``[B, size, size, 3]``.

    Resizes the shorter side to ``size`` (bicubic, antialiased when
    downsampling, via ``jax.image.resize``), center-crops ``size x size`` and
    normalises with ``mean``/``std``. transformers' ``CLIPImageProcessor``
    resizes with PIL on uint8 images, so results differ slightly (PIL's bicubic
    resampling and its 8-bit rounding; typically a few 1e-3 in [0, 1] units),
    which moves CLIP scores by a small amount, not their ranking in practice.
    """
    b, h, w, c = images.shape
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)  # transformers' rule (floor)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    x = images.astype(jnp.float32)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top:top + size, left:left + size, :]
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (x - mean) / std


def map_clip_vision_into(
    src: SourceTensors, out: TensorMap, cfg: CLIPVisionConfig, *, src_prefix: str,
    dst_prefix: str,
) -> None:
    """Maps a CLIP vision tower under ``src_prefix`` onto ours under ``dst_prefix``."""
    p, q = src_prefix, dst_prefix
    name = f"{p}embeddings.patch_embedding.weight"
    w = src.take(name)
    put(out, f"{q}patch_embedding.kernel", name, None if w is None else conv_kernel(w))
    name = f"{p}embeddings.class_embedding"
    put(out, f"{q}class_embedding", name, src.take(name))
    name = f"{p}embeddings.position_embedding.weight"
    put(out, f"{q}position_embedding.embedding", name, src.take(name))
    src.maybe(f"{p}embeddings.position_ids")  # a buffer some checkpoints carry
    map_layer_norm(src, out, f"{p}pre_layrnorm", f"{q}pre_layrnorm")
    map_clip_encoder_layers(src, out, src_prefix=p, dst_prefix=q,
                            num_layers=cfg.num_hidden_layers)
    map_layer_norm(src, out, f"{p}post_layernorm", f"{q}post_layernorm")


def map_clip_hf(src: SourceTensors, cfg: CLIPConfig) -> TensorMap:
    """transformers ``CLIPModel`` state dict -> ``CLIPModel`` state paths."""
    out: TensorMap = {}
    map_clip_text_into(src, out, cfg.text, src_prefix="text_model.", dst_prefix="text_model.")
    map_clip_vision_into(src, out, cfg.vision, src_prefix="vision_model.",
                         dst_prefix="vision_model.")
    for proj in ("visual_projection", "text_projection"):
        w = src.take(f"{proj}.weight")
        put(out, f"{proj}.kernel", f"{proj}.weight", None if w is None else linear_kernel(w))
    put(out, "logit_scale", "logit_scale", src.take("logit_scale"))
    return out


def load_clip(path: str | Path, *, dtype=None, config: CLIPConfig | None = None) -> CLIPModel:
    """Loads a transformers ``CLIPModel`` directory (config.json + safetensors).

    Raises:
      WeightMismatchError: listing every missing, unexpected or mis-shaped tensor.
    """
    cfg = config or CLIPConfig.from_hf(read_hf_config(path))
    tensors = convert.read_safetensors(path)
    return convert.load_model(
        lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)),
        lambda src: map_clip_hf(src, cfg),
        tensors,
        origin=str(path),
        dtype=dtype,
    )
