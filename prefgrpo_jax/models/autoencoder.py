"""FLUX VAE (diffusers ``AutoencoderKL``) in Flax NNX, plus FLUX latent packing.

Layout conventions (read these before calling anything):

* Inside the model everything is **NHWC** (channels last, what XLA convs like).
* Images are ``[B, H, W, 3]`` float in ``[0, 1]`` (in and out).
* "Raw" latents are what the encoder's Gaussian produces / the decoder eats:
  NHWC ``[B, h, w, C]`` with ``h = H / vae_scale_factor`` (8 for FLUX) and
  ``C = latent_channels`` (16 for FLUX). ``encode``/``decode_raw`` use these.
* "Model-space" latents are what the FLUX transformer works in, after
  ``(raw - shift_factor) * scaling_factor``, in the diffusers pipeline's
  **NCHW** ``[B, C, h, w]`` layout so that ``pack_latents``/``unpack_latents``
  match ``FluxPipeline._pack_latents``/``_unpack_latents`` bit for bit.
  ``encode_to_latents`` produces these and ``decode`` consumes them.
* Packed latents (the transformer's tokens) are ``[B, (h/2)*(w/2), 4C]`` with
  the feature axis ordered ``(c, ph, pw)``; their position ids come from
  ``latent_image_ids(h, w)``.

The math mirrors diffusers' ``Encoder``/``Decoder`` (``DownEncoderBlock2D``,
``UpDecoderBlock2D``, ``UNetMidBlock2D`` with one single-head spatial attention),
and ``load_diffusers`` reads a diffusers ``vae/`` directory (``config.json`` +
safetensors) through ``prefgrpo_jax.convert``, checking every name and shape.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prefgrpo_jax import convert
from prefgrpo_jax.convert import SourceTensors, TensorMap, conv_kernel, linear_kernel, put

_GN_EPS = 1e-6  # diffusers' VAE uses eps 1e-6 in every GroupNorm.


# ---------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Shape and latent-scaling hyper-parameters of an ``AutoencoderKL``.

    Field names follow diffusers' ``config.json``; ``from_diffusers`` reads one.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderConfig.block_out_channels {self.block_out_channels}: every "
                f"entry must be divisible by norm_num_groups={self.norm_num_groups} "
                f"(not {bad})."
            )
        if not self.block_out_channels:
            raise ValueError("AutoencoderConfig.block_out_channels must not be empty.")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for FLUX), as in diffusers."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "AutoencoderConfig":
        """Reads a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Raises ValueError for architectures this module does not implement
        (other block types or activations) instead of silently mis-loading.
        """
        cls_name = config.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"Expected an AutoencoderKL config, got _class_name={cls_name!r}.")
        act = config.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"AutoencoderKL act_fn={act!r} is not supported (only 'silu').")
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = config.get(key)
            if types is None:
                continue
            if len(types) != n or any(t != want for t in types):
                raise ValueError(
                    f"AutoencoderKL {key}={list(types)} is not supported: expected "
                    f"{n} x {want!r} (one per block_out_channels entry)."
                )
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, default in defaults.items():
            value = config.get(name, default)
            if value is None:  # e.g. shift_factor: null in SD VAEs
                value = 0.0 if name == "shift_factor" else default
            kwargs[name] = value
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        kwargs["scaling_factor"] = float(kwargs["scaling_factor"])
        kwargs["shift_factor"] = float(kwargs["shift_factor"])
        return cls(**kwargs)

    @classmethod
    def flux_dev(cls) -> "AutoencoderConfig":
        """FLUX.1-dev / FLUX.1-schnell ``vae/config.json``."""
        return cls()

    @classmethod
    def tiny(cls) -> "AutoencoderConfig":
        """A CPU-sized VAE for tests (2 levels: 4x spatial compression)."""
        return cls(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


# ---------------------------------------------------------------------------
# Layers (NHWC).


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, pad: int | None = None, dtype=None, param_dtype=jnp.float32) -> nnx.Conv:
    p = (k // 2) if pad is None else pad
    return nnx.Conv(
        cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=((p, p), (p, p)),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


def _norm(c: int, groups: int, rngs: nnx.Rngs, *, dtype=None, param_dtype=jnp.float32) -> nnx.GroupNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2.
    return nnx.GroupNorm(
        c, num_groups=groups, epsilon=_GN_EPS, use_fast_variance=False,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: x + conv(silu(gn(conv(silu(gn(x))))))."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = _norm(cin, groups, rngs, **kw)
        self.conv1 = _conv(cin, cout, 3, rngs, **kw)
        self.norm2 = _norm(cout, groups, rngs, **kw)
        self.conv2 = _conv(cout, cout, 3, rngs, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, rngs, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nnx.Module):
    """Pad (0,1) on H and W (bottom/right), then 3x3 stride-2 conv without padding."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = _conv(c, c, 3, rngs, stride=2, pad=0, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then 3x3 conv (padding 1)."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = _conv(c, c, 3, rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class SpatialAttention(nnx.Module):
    """Single-head self-attention over the H*W positions, with a residual.

    Matches diffusers' ``Attention`` as built by the VAE's ``UNetMidBlock2D``
    (heads = 1, group_norm on the input, residual connection, rescale 1).
    """

    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = _norm(c, groups, rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = nnx.Linear(c, c, **kw)
        self.to_k = nnx.Linear(c, c, **kw)
        self.to_v = nnx.Linear(c, c, **kw)
        self.to_out = nnx.Linear(c, c, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # [B, T, N=1, D]; softmax(q k^T / sqrt(D)) v.
        o = jax.nn.dot_product_attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :])
        o = self.to_out(o.reshape(b, h * w, c))
        return x + o.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""

    def __init__(self, c: int, groups: int, add_attention: bool, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(c, c, groups, rngs=rngs, **kw) for _ in range(2)])
        self.attention = SpatialAttention(c, groups, rngs=rngs, **kw) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [ResnetBlock(cin if j == 0 else cout, cout, groups, rngs=rngs, **kw) for j in range(n)]
        )
        self.downsample = Downsample(cout, rngs=rngs, **kw) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.downsample(x) if self.downsample is not None else x


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [ResnetBlock(cin if j == 0 else cout, cout, groups, rngs=rngs, **kw) for j in range(n)]
        )
        self.upsample = Upsample(cout, rngs=rngs, **kw) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nnx.Module):
    """Image NHWC [B,H,W,in] -> moments NHWC [B,H/f,W/f,2*latent] (mean ‖ logvar)."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, rngs, **kw)
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            blocks.append(
                DownBlock(cin, cout, cfg.layers_per_block, g, i < len(ch) - 1, rngs=rngs, **kw)
            )
            cin = cout
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, rngs=rngs, **kw)
        self.conv_norm_out = _norm(ch[-1], g, rngs, **kw)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Raw latents NHWC [B,h,w,latent] -> image NHWC [B,h*f,w*f,out] in about [-1,1]."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, rngs, **kw)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, rngs=rngs, **kw)
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            blocks.append(
                UpBlock(cin, cout, cfg.layers_per_block + 1, g, i < len(ch) - 1, rngs=rngs, **kw)
            )
            cin = cout
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = _norm(ch[-1], g, rngs, **kw)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, rngs, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------
# The autoencoder.


class Autoencoder(nnx.Module):
    """diffusers ``AutoencoderKL`` (the FLUX VAE) in NNX.

    Attributes:
      cfg: the ``AutoencoderConfig``.
      scaling_factor, shift_factor: plain Python floats (static, from the config).
      encoder, decoder: the two halves; ``quant_conv``/``post_quant_conv`` are
        1x1 convs present only when the config asks for them (not in FLUX).

    Computation runs in the dtype of the parameters (e.g. bf16 weights -> bf16
    activations, with GroupNorm statistics in fp32); images and latents come
    back as float32.
    """

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor)
        self.encoder = Encoder(cfg, rngs=rngs, **kw)
        self.decoder = Decoder(cfg, rngs=rngs, **kw)
        lc = cfg.latent_channels
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, rngs, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, rngs, **kw) if cfg.use_post_quant_conv else None

    def _compute_dtype(self) -> jnp.dtype:
        return self.encoder.conv_in.kernel.dtype

    # -- encoding --------------------------------------------------------------

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes images to the posterior's raw (unscaled) mean and log-variance.

        Args:
          images: ``[B, H, W, in_channels]`` in ``[0, 1]`` (mapped to ``[-1, 1]``
            inside, like the FLUX pipeline's image processor). H and W must be
            multiples of ``cfg.vae_scale_factor``.

        Returns:
          ``(mean, logvar)``, each NHWC ``[B, H/f, W/f, latent_channels]``
          float32; logvar is clamped to ``[-30, 20]`` as in diffusers'
          ``DiagonalGaussianDistribution``.
        """
        f = self.cfg.vae_scale_factor
        if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"encode expects images [B, H, W, C] with H, W multiples of {f}; got {images.shape}."
            )
        x = (2.0 * images - 1.0).astype(self._compute_dtype())
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode_to_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images ``[B,H,W,3]`` in [0,1] -> model-space latents NCHW ``[B,C,H/f,W/f]``.

        Returns ``(z - shift_factor) * scaling_factor`` where ``z`` is the
        posterior mean, or a posterior sample ``mean + exp(logvar/2) * eps``
        when ``key`` is given. The inverse of ``decode``.
        """
        mean, logvar = self.encode(images)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        z = (z - self.shift_factor) * self.scaling_factor
        return jnp.transpose(z, (0, 3, 1, 2))

    # -- decoding --------------------------------------------------------------

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Raw latents NHWC ``[B,h,w,C]`` -> decoder output NHWC ``[B,h*f,w*f,3]``.

        No latent scaling and no post-processing: the output is the decoder's
        own range (about ``[-1, 1]``), float32, unclipped.
        """
        if z.ndim != 4 or z.shape[-1] != self.cfg.latent_channels:
            raise ValueError(
                f"decode_raw expects NHWC latents [B, h, w, {self.cfg.latent_channels}]; got {z.shape}."
            )
        z = z.astype(self._compute_dtype())
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Model-space latents NCHW ``[B,C,h,w]`` -> images NHWC ``[B,h*f,w*f,3]`` in [0,1].

        ``latents`` are what the transformer produces after ``unpack_latents``.
        Applies ``latents / scaling_factor + shift_factor`` (as FluxPipeline does
        before ``vae.decode``), decodes, and post-processes like diffusers'
        ``VaeImageProcessor``: ``clip(x / 2 + 0.5, 0, 1)``. float32.
        """
        if latents.ndim != 4 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"decode expects model-space NCHW latents [B, {self.cfg.latent_channels}, h, w]; "
                f"got {latents.shape}. (Packed tokens? call unpack_latents first; NHWC raw "
                "latents? use decode_raw.)"
            )
        z = latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor
        x = self.decode_raw(jnp.transpose(z, (0, 2, 3, 1)))
        return jnp.clip(x / 2.0 + 0.5, 0.0, 1.0)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean: images in [0,1] -> images in [0,1]."""
        return self.decode(self.encode_to_latents(images))


# ---------------------------------------------------------------------------
# FLUX latent packing (pipeline helpers; pure jnp, jit-friendly).


def latent_hw(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Pixel size -> latent size as FluxPipeline computes it (even, floored).

    ``(2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2)))``;
    e.g. 720 x 720 -> (90, 90), 1024 x 1024 -> (128, 128).
    """
    f = vae_scale_factor * 2
    return 2 * (int(height) // f), 2 * (int(width) // f)


def pack_latents(z: jax.Array) -> jax.Array:
    """NCHW latents ``[B,C,h,w]`` -> tokens ``[B,(h/2)*(w/2),4C]`` (features ordered c, ph, pw).

    Identical to ``FluxPipeline._pack_latents``. h and w must be even.
    """
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents needs even latent height/width, got {(h, w)}.")
    z = z.reshape(b, c, h // 2, 2, w // 2, 2)
    z = jnp.transpose(z, (0, 2, 4, 1, 3, 5))
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: jax.Array, h: int, w: int) -> jax.Array:
    """Tokens ``[B,(h/2)*(w/2),4C]`` -> NCHW latents ``[B,C,h,w]``; inverse of ``pack_latents``.

    ``h``, ``w`` are *latent* sizes (see ``latent_hw``), not pixel sizes, unlike
    ``FluxPipeline._unpack_latents(latents, height_px, width_px, vae_scale_factor)``.
    """
    b, n, d = x.shape
    if h % 2 or w % 2 or n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(
            f"unpack_latents: tokens {x.shape} do not fit latent size {(h, w)} "
            f"(need even h, w, L = (h/2)*(w/2) = {(h // 2) * (w // 2)}, features divisible by 4)."
        )
    x = x.reshape(b, h // 2, w // 2, d // 4, 2, 2)
    x = jnp.transpose(x, (0, 3, 1, 4, 2, 5))
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int) -> jax.Array:
    """Position ids of the packed tokens, ``[(h/2)*(w/2), 3]`` float32.

    ``ids[:, 0] = 0``, ``ids[:, 1]`` = token row, ``ids[:, 2]`` = token column,
    row-major, as ``FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, ...)``.
    ``h``, ``w`` are latent sizes.
    """
    hh, ww = h // 2, w // 2
    rows = jnp.broadcast_to(jnp.arange(hh, dtype=jnp.float32)[:, None], (hh, ww))
    cols = jnp.broadcast_to(jnp.arange(ww, dtype=jnp.float32)[None, :], (hh, ww))
    ids = jnp.stack([jnp.zeros((hh, ww), jnp.float32), rows, cols], axis=-1)
    return ids.reshape(hh * ww, 3)


# ---------------------------------------------------------------------------
# diffusers weights.


def _map_conv(src: SourceTensors, out: TensorMap, target: str, source: str, *, bias: bool = True) -> None:
    w = src.take(f"{source}.weight")
    put(out, f"{target}.kernel", f"{source}.weight", None if w is None else conv_kernel(w))
    if bias:
        put(out, f"{target}.bias", f"{source}.bias", src.take(f"{source}.bias"))


def _map_linear(src: SourceTensors, out: TensorMap, target: str, source: str) -> None:
    w = src.take(f"{source}.weight")
    if w is not None and w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]  # very old checkpoints store attention projections as 1x1 convs
    put(out, f"{target}.kernel", f"{source}.weight", None if w is None else linear_kernel(w))
    put(out, f"{target}.bias", f"{source}.bias", src.take(f"{source}.bias"))


def _map_norm(src: SourceTensors, out: TensorMap, target: str, source: str) -> None:
    put(out, f"{target}.scale", f"{source}.weight", src.take(f"{source}.weight"))
    put(out, f"{target}.bias", f"{source}.bias", src.take(f"{source}.bias"))


def _map_resnet(src: SourceTensors, out: TensorMap, target: str, source: str, has_shortcut: bool) -> None:
    _map_norm(src, out, f"{target}.norm1", f"{source}.norm1")
    _map_conv(src, out, f"{target}.conv1", f"{source}.conv1")
    _map_norm(src, out, f"{target}.norm2", f"{source}.norm2")
    _map_conv(src, out, f"{target}.conv2", f"{source}.conv2")
    if has_shortcut:
        _map_conv(src, out, f"{target}.conv_shortcut", f"{source}.conv_shortcut")


def _map_mid(src: SourceTensors, out: TensorMap, target: str, source: str, cfg: AutoencoderConfig) -> None:
    for j in range(2):
        _map_resnet(src, out, f"{target}.resnets.{j}", f"{source}.resnets.{j}", False)
    if cfg.mid_block_add_attention:
        t, s = f"{target}.attention", f"{source}.attentions.0"
        _map_norm(src, out, f"{t}.group_norm", f"{s}.group_norm")
        for name in ("to_q", "to_k", "to_v"):
            _map_linear(src, out, f"{t}.{name}", f"{s}.{name}")
        _map_linear(src, out, f"{t}.to_out", f"{s}.to_out.0")


def map_diffusers(src: SourceTensors, cfg: AutoencoderConfig) -> TensorMap:
    """diffusers ``AutoencoderKL`` state-dict names -> ``Autoencoder`` NNX state paths.

    Every tensor the config implies is ``take``n from ``src`` (absent ones are
    recorded as missing); tensors never taken are reported as unexpected by
    ``convert.check_mapping``.
    """
    out: TensorMap = {}
    ch = cfg.block_out_channels
    n = cfg.layers_per_block

    # Encoder.
    _map_conv(src, out, "encoder.conv_in", "encoder.conv_in")
    cin = ch[0]
    for i, cout in enumerate(ch):
        for j in range(n):
            c_in = cin if j == 0 else cout
            _map_resnet(src, out, f"encoder.down_blocks.{i}.resnets.{j}",
                        f"encoder.down_blocks.{i}.resnets.{j}", c_in != cout)
        if i < len(ch) - 1:
            _map_conv(src, out, f"encoder.down_blocks.{i}.downsample.conv",
                      f"encoder.down_blocks.{i}.downsamplers.0.conv")
        cin = cout
    _map_mid(src, out, "encoder.mid_block", "encoder.mid_block", cfg)
    _map_norm(src, out, "encoder.conv_norm_out", "encoder.conv_norm_out")
    _map_conv(src, out, "encoder.conv_out", "encoder.conv_out")

    # Decoder.
    rch = tuple(reversed(ch))
    _map_conv(src, out, "decoder.conv_in", "decoder.conv_in")
    _map_mid(src, out, "decoder.mid_block", "decoder.mid_block", cfg)
    cin = rch[0]
    for i, cout in enumerate(rch):
        for j in range(n + 1):
            c_in = cin if j == 0 else cout
            _map_resnet(src, out, f"decoder.up_blocks.{i}.resnets.{j}",
                        f"decoder.up_blocks.{i}.resnets.{j}", c_in != cout)
        if i < len(rch) - 1:
            _map_conv(src, out, f"decoder.up_blocks.{i}.upsample.conv",
                      f"decoder.up_blocks.{i}.upsamplers.0.conv")
        cin = cout
    _map_norm(src, out, "decoder.conv_norm_out", "decoder.conv_norm_out")
    _map_conv(src, out, "decoder.conv_out", "decoder.conv_out")

    if cfg.use_quant_conv:
        _map_conv(src, out, "quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        _map_conv(src, out, "post_quant_conv", "post_quant_conv")
    return out


def load_diffusers(path: str | Path, *, dtype: jnp.dtype | None = None,
                   shardings: convert.ShardingFn | None = None) -> Autoencoder:
    """Loads a diffusers ``AutoencoderKL`` directory (e.g. ``FLUX.1-dev/vae``).

    Args:
      path: directory with ``config.json`` and safetensors weights
        (``diffusion_pytorch_model.safetensors`` or a sharded index).
      dtype: optional parameter dtype (e.g. ``jnp.bfloat16``); default fp32.
        Activations follow the parameter dtype.
      shardings: where each parameter is born (``convert.build_model``).

    Returns:
      The ``Autoencoder``, with ``scaling_factor``/``shift_factor`` from the config.

    Raises:
      FileNotFoundError: no config.json / no safetensors.
      ValueError: unsupported architecture in the config.
      convert.WeightMismatchError: missing, unexpected or mis-shaped tensors
        (all listed, by their checkpoint names).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {path} (expected a diffusers AutoencoderKL directory).")
    cfg = AutoencoderConfig.from_diffusers(json.loads(config_file.read_text()))
    tensors = convert.open_safetensors(path)
    param_dtype = dtype if dtype is not None else jnp.float32
    return convert.load_model(
        lambda: Autoencoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype),
        lambda src: map_diffusers(src, cfg),
        tensors,
        origin=str(path),
        dtype=dtype,
        shardings=shardings,
    )
