"""FLUX.1 transformer (MM-DiT rectified-flow velocity model) in Flax NNX.

Follows the original Black Forest Labs implementation (``flux/model.py``,
``flux/modules/layers.py``); attribute names are BFL's, so BFL single-file
checkpoints map onto the NNX state almost by identity, and diffusers
``FluxTransformer2DModel`` checkpoints through :func:`map_diffusers`.

The fused linears (the double block's qkv, the single block's linear1 and
linear2) are stored head-grouped rather than in BFL's contiguous order (per
head its q, k, v and MLP slice: :class:`HeadGrouped`), so that a split over the
"tensor" mesh axis is whole heads; the loaders and exporters convert.

The 19 double-stream and 38 single-stream blocks are each one module whose
parameters carry a leading layer axis (created with ``nnx.vmap``) and are
applied with ``nnx.scan``, so compile time does not grow with depth;
``remat=True`` recomputes each block's activations in the backward pass
(``remat_policy`` chooses what is kept: see :data:`REMAT_POLICIES`).
``attention`` picks the joint-attention kernel per platform (cuDNN flash on
GPU, Pallas splash on TPU, einsum or query-chunked einsum on CPU: see
:data:`ATTENTION_IMPLS`). ``lora`` (a :class:`LoraSpec`) adds peft-style
adapters (``nnx.LoRA``) to the linears it names, one per diffusers projection
even where ours are fused.

Call convention (BFL)::

    v = model(img, img_ids, txt, txt_ids, timesteps, y, guidance)

with ``img [B, L, C_in]`` packed latents, ``img_ids [B, L, 3]`` and
``txt_ids [B, T, 3]`` RoPE positions, ``txt [B, T, D_ctx]`` T5 states,
``timesteps [B]`` in [0, 1] (sigma; embedded as ``t * 1000``), ``y [B, D_pool]``
pooled CLIP, ``guidance [B]`` a raw scale such as 3.5 (embedded as
``g * 1000``). Returns the velocity ``[B, L, C_out]`` in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax import lazy_tensors
from prefgrpo_jax.convert import (
    SourceTensors,
    TensorMap,
    linear_kernel,
    load_model,
    put,
    put_stacked,
    ShardingFn,
    open_safetensors,
    stack_layers,
)
from prefgrpo_jax.lazy_tensors import LazyTensor
from prefgrpo_jax.sharding import constrain, logical_size, logical_spec

__all__ = [
    "FluxConfig",
    "FluxTransformer",
    "timestep_embedding",
    "rope_frequencies",
    "apply_rope",
    "map_diffusers",
    "map_bfl",
    "load_diffusers",
    "load_bfl",
    "abstract_transformer",
    "diffusers_config",
    "LoraSpec",
    "LoraSite",
    "lora_layout",
    "HeadGrouped",
    "fused_layouts",
]

# ---------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True, kw_only=True)
class FluxConfig:
    """Hyper-parameters of a FLUX transformer (BFL ``FluxParams``).

    Attributes:
      in_channels: channels of a packed latent token (16 latent channels x 2x2).
      out_channels: channels of the predicted velocity token.
      hidden_size: model width; ``num_heads * head_dim``.
      num_heads: attention heads.
      depth: double-stream (MM-DiT) blocks.
      depth_single: single-stream blocks.
      axes_dim: RoPE dimensions per position axis; sums to ``head_dim``.
      context_dim: width of the text-encoder (T5) states.
      vec_dim: width of the pooled (CLIP) text vector.
      guidance_embed: whether the model embeds a guidance scale (FLUX.1-dev).
      theta: RoPE base.
      mlp_ratio: MLP hidden width / hidden_size.
      qkv_bias: bias on the double-stream qkv projections.
    """

    in_channels: int
    out_channels: int
    hidden_size: int
    num_heads: int
    depth: int
    depth_single: int
    axes_dim: tuple[int, ...]
    context_dim: int
    vec_dim: int
    guidance_embed: bool
    theta: int = 10_000
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        for name in ("in_channels", "out_channels", "hidden_size", "num_heads",
                     "depth", "depth_single", "context_dim", "vec_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"FluxConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig: num_heads ({self.num_heads}) x head_dim must equal hidden_size "
                f"({self.hidden_size}), but {self.hidden_size} is not divisible by "
                f"{self.num_heads}."
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"FluxConfig: sum(axes_dim) = sum({self.axes_dim}) = {sum(self.axes_dim)} must "
                f"equal head_dim = hidden_size / num_heads = {self.head_dim}."
            )
        if any(a <= 0 or a % 2 for a in self.axes_dim):
            raise ValueError(
                f"FluxConfig: every entry of axes_dim must be a positive even number (RoPE "
                f"rotates pairs), got {self.axes_dim}."
            )
        if self.mlp_hidden_dim < 1:
            raise ValueError(f"FluxConfig.mlp_ratio too small: {self.mlp_ratio}.")
        if self.mlp_hidden_dim % self.num_heads:
            raise ValueError(
                f"FluxConfig: the MLP width hidden_size x mlp_ratio = {self.mlp_hidden_dim} must be "
                f"divisible by num_heads ({self.num_heads}): the single block's fused linear1/linear2 "
                "hold one MLP slice per head (see HeadGrouped); choose mlp_ratio accordingly.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    # -- constructors ------------------------------------------------------

    @classmethod
    def flux_dev(cls) -> FluxConfig:
        """FLUX.1-dev (12B, guidance-distilled)."""
        return cls(
            in_channels=64, out_channels=64, hidden_size=3072, num_heads=24, depth=19,
            depth_single=38, axes_dim=(16, 56, 56), context_dim=4096, vec_dim=768,
            guidance_embed=True,
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> FluxConfig:
        """A few-hundred-kilobyte model for CPU tests; keyword overrides allowed."""
        base = cls(
            in_channels=64, out_channels=64, hidden_size=64, num_heads=2, depth=2,
            depth_single=2, axes_dim=(8, 12, 12), context_dim=32, vec_dim=16,
            guidance_embed=True,
        )
        return dataclasses.replace(base, **overrides)

    # Keys of diffusers' FluxTransformer2DModel config.json and their defaults.
    _DIFFUSERS_DEFAULTS = {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    }

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> FluxConfig:
        """From a diffusers ``FluxTransformer2DModel`` ``config.json`` dict."""
        unknown = sorted(k for k in config if not k.startswith("_")
                         and k not in cls._DIFFUSERS_DEFAULTS)
        if unknown:
            warnings.warn(f"FluxConfig.from_diffusers ignores unknown keys {unknown}.",
                          stacklevel=2)
        c = {**cls._DIFFUSERS_DEFAULTS,
             **{k: v for k, v in config.items() if k in cls._DIFFUSERS_DEFAULTS}}
        if c["patch_size"] != 1:
            raise ValueError(
                f"FluxConfig.from_diffusers: patch_size must be 1 (latents are packed 2x2 "
                f"outside the transformer), got {c['patch_size']}."
            )
        heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
        return cls(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"] or c["in_channels"]),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(c["num_layers"]),
            depth_single=int(c["num_single_layers"]),
            axes_dim=tuple(c["axes_dims_rope"]),
            context_dim=int(c["joint_attention_dim"]),
            vec_dim=int(c["pooled_projection_dim"]),
            guidance_embed=bool(c["guidance_embeds"]),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers ``FluxTransformer2DModel`` config (for tests/export)."""
        if self.mlp_ratio != 4.0 or not self.qkv_bias or self.theta != 10_000:
            raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio=4, "
                             "qkv_bias=True and theta=10000.")
        return {
            "patch_size": 1, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "num_layers": self.depth,
            "num_single_layers": self.depth_single, "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads, "joint_attention_dim": self.context_dim,
            "pooled_projection_dim": self.vec_dim, "guidance_embeds": self.guidance_embed,
            "axes_dims_rope": list(self.axes_dim),
        }


# ---------------------------------------------------------------------------
# Functional pieces.


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of ``t * time_factor``: ``[cos(args), sin(args)]`` (fp32).

    Matches BFL ``timestep_embedding`` and diffusers ``Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)`` applied to ``t * 1000``.
    """
    t = time_factor * jnp.asarray(t, jnp.float32)
    half = dim // 2
    # fp32 like BFL/diffusers: at t*1000 ~ 1e3 rad, fp32 phase resolution is ~6e-5 anyway.
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def rope_frequencies(ids: jax.Array, axes_dim: tuple[int, ...], theta: float) -> tuple[jax.Array, jax.Array]:
    """RoPE (cos, sin) for positions ``ids [B, L, n_axes]``; each ``[B, L, head_dim/2]``.

    Axis ``i`` gets ``axes_dim[i]/2`` frequencies ``theta ** (-2k / axes_dim[i])``
    (BFL ``EmbedND``); the frequencies are constants computed in float64.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} position axes, config has "
                         f"axes_dim={axes_dim}.")
    pos = jnp.asarray(ids, jnp.float32)
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / (float(theta) ** (np.arange(0, d, 2, dtype=np.float64) / d))
        angles.append(pos[..., i:i + 1] * jnp.asarray(omega, jnp.float32))
    ang = jnp.concatenate(angles, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, pe: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates consecutive pairs of ``x [B, L, H, D]`` by ``pe`` (cos, sin ``[B, L, D/2]``).

    ``(x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1)``, computed in fp32.
    """
    cos, sin = (p[:, :, None, :] for p in pe)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ``jax.checkpoint_policies`` usable as ``remat_policy``. "nothing_saveable"
# keeps only each block's input (least memory: the choice for FLUX.1-dev on
# accelerators); "dots_with_no_batch_dims_saveable" also keeps the outputs of
# the linear layers and recomputes the rest (attention, norms, modulation):
# on CPU that is the fastest backward pass measured, faster than no remat at
# all, because writing every elementwise residual into the scan's stacked
# buffers costs more memory traffic than recomputing it
# (experiments/results/profile.md).
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def check_remat_policy(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {name!r}: use one of {', '.join(REMAT_POLICIES)}.")


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in fp32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# Attention implementations (``model.attention``). All take RoPE'd
# ``q, k, v [B, L, H, D]`` and return ``[B, L, H, D]``; "auto" picks per backend
# at trace time (:func:`resolve_attention`).
#   einsum  - heads-major fp32-score einsums: the reference, fastest on XLA CPU.
#   xla     - ``jax.nn.dot_product_attention(implementation="xla")``.
#   cudnn   - the same with cuDNN's fused flash attention (GPU; bf16/fp16 only).
#   splash  - Pallas splash attention (TPU), vmapped over the batch, in a
#             shard_map over the batch/heads mesh axes when sharded.
#   chunked - the einsum math over query chunks: O(L x chunk) memory, not O(L^2).
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash", "chunked")
_ATTENTION_BACKEND = {"cudnn": "gpu", "splash": "tpu"}  # kernels that run on one backend only
_AUTO_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}  # any other backend: einsum
# Splash block size (queries and keys per kernel tile): 512 divides FLUX.1's
# 512 text + 4096 image tokens, and larger tiles keep the TPU's MXU busier.
_SPLASH_BLOCK = 512


def check_attention(name: str, chunk: int) -> None:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention implementation {name!r} (model.attention): use one of "
                         f"{', '.join(ATTENTION_IMPLS)}.")
    if chunk < 1:
        raise ValueError(f"model.attention_chunk={chunk}: must be >= 1 (queries per chunk, e.g. 512).")


def resolve_attention(name: str) -> str:
    """The implementation ``name`` runs as on ``jax.default_backend()``.

    ``auto`` -> cudnn on GPU, splash on TPU, einsum elsewhere. A platform kernel
    asked for on another backend is an error here rather than an opaque one
    from its lowering.
    """
    backend = jax.default_backend()
    if name == "auto":
        return _AUTO_ATTENTION.get(backend, "einsum")
    needs = _ATTENTION_BACKEND.get(name)
    if needs is not None and backend != needs:
        raise ValueError(
            f"model.attention={name!r} runs only on {needs.upper()}, but JAX's backend is {backend!r}: "
            "use 'auto' (picks per backend), 'einsum' or 'chunked'.")
    return name


def _softmax_attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Heads-major ``q [B, H, Lq, D]``, ``k, v [B, H, L, D]`` -> ``[B, H, Lq, D]``; fp32 scores."""
    scores = jnp.einsum("bhld,bhmd->bhlm", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
    return jnp.einsum("bhlm,bhmd->bhld", probs, v)


def _heads_major(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """``[B, L, H, D]`` <-> ``[B, H, L, D]`` (the swap is its own inverse)."""
    return tuple(x.transpose(0, 2, 1, 3) for x in xs)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The reference. Heads-major rather than ``jax.nn.dot_product_attention``:
    the same math, but XLA's CPU backend runs forward and backward 5-10% faster
    with the head axis in front (interleaved A/B timing, benchmark model `medium`).
    """
    (out,) = _heads_major(_softmax_attend(*_heads_major(q, k, v)))
    return out


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """:func:`einsum_attention` one chunk of ``chunk`` queries at a time.

    Scores of one chunk (``[B, H, chunk, L]``) exist at a time, and each chunk is
    rematerialised, so the backward pass keeps only the query chunks instead of
    every chunk's probabilities: memory O(L x chunk) both ways. ``L`` need not
    be a multiple of ``chunk``: queries are zero-padded and the padded rows
    dropped (keys are not padded, so no mask is needed).
    """
    b, length, h, d = q.shape
    if length <= chunk:
        return einsum_attention(q, k, v)
    n = -(-length // chunk)
    qh, kh, vh = _heads_major(q, k, v)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n * chunk - length), (0, 0)))
    chunks = jnp.moveaxis(qh.reshape(b, h, n, chunk, d), 2, 0)  # [n, B, H, chunk, D]
    # prevent_cse=False: inside a loop CSE cannot merge the recomputation away.
    attend = jax.checkpoint(lambda qc: _softmax_attend(qc, kh, vh), prevent_cse=False)
    out = jnp.moveaxis(jax.lax.map(attend, chunks), 0, 2).reshape(b, h, n * chunk, d)
    (out,) = _heads_major(out[:, :, :length])
    return out


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention``'s XLA path (fp32 scores and softmax)."""
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN fused flash attention; fp32 inputs run in bf16 (cuDNN has no fp32
    kernel) and the output is cast back. Softmax statistics are fp32 in cuDNN."""
    dtype = q.dtype
    if dtype not in (jnp.bfloat16, jnp.float16):
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Pallas TPU splash attention, non-causal, vmapped over the batch.

    Mosaic kernels cannot be partitioned by XLA, so under
    ``sharding.activation_sharding`` the kernel runs in a ``shard_map`` over
    the mesh axes the batch (and heads) map to: each device attends its own
    rows over the full sequence, with no communication. ``interpret=True``
    runs the kernel in Pallas' interpreter (any backend; tests).
    """
    local = functools.partial(_splash_local, interpret=interpret)
    # The sequence axis is never split here: every query needs every key.
    found = logical_spec(q.shape, ("batch", None, "heads", None))
    if found is None:
        return local(q, k, v)
    mesh, spec = found
    # check_vma=False: pallas_call has no varying-manual-axes rule.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q, k, v)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """:func:`splash_attention` on one device's ``[b, L, h, D]``.

    The kernel wants heads-major ``[h, L, D]`` per example, unscaled scores and
    ``L`` a multiple of its block: ``q`` is pre-scaled by ``D**-0.5`` (in fp32),
    and a ragged ``L`` is padded to the block with the padding in a segment of
    its own, so real queries never attend to padded keys.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as splash_mask,
    )

    _, length, h, d = q.shape
    block = min(_SPLASH_BLOCK, _round_up(length, 128))
    padded = _round_up(length, block)
    q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    qh, kh, vh = (jnp.pad(x, pad) for x in _heads_major(q, k, v))
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * h)
    kernel = splash.make_splash_mha(
        mask, block_sizes=splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    segment = (jnp.arange(padded) >= length).astype(jnp.int32)
    segment_ids = splash.SegmentIds(q=segment, kv=segment)
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segment_ids))(qh, kh, vh)
    (out,) = _heads_major(out[:, :, :length])
    return out


def attention(q: jax.Array, k: jax.Array, v: jax.Array, pe: tuple[jax.Array, jax.Array],
              impl: str = "einsum", chunk: int = 512) -> jax.Array:
    """Joint attention with RoPE; ``q, k, v [B, L, H, D]`` -> ``[B, L, H*D]``.

    ``impl`` is one of :data:`ATTENTION_IMPLS` (``auto`` resolved for the
    current backend); ``chunk`` is the query chunk of ``chunked``.
    """
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    impl = resolve_attention(impl)
    if impl == "chunked":
        out = chunked_attention(q, k, v, chunk)
    else:
        fns = {"einsum": einsum_attention, "xla": xla_attention, "cudnn": cudnn_attention,
               "splash": splash_attention}
        out = fns[impl](q, k, v)
    return out.reshape(*out.shape[:2], -1)


# ---------------------------------------------------------------------------
# Head-grouped storage of the fused linears (what makes tensor parallelism work).
#
# BFL fuses projections along one axis: the double block's qkv output columns
# are [q | k | v], the single block's linear1 columns [q | k | v | mlp_in] and
# its linear2 input rows [attn | mlp_hidden]. A contiguous 1/T slice of such an
# axis (all a NamedSharding over the "tensor" mesh axis can express) is all of
# q and part of k, not whole heads. So we store these axes head-grouped: group
# g (one per attention head) holds the g-th 1/H of every part, e.g. linear1's
# columns are [q_0 k_0 v_0 mlp_0 | q_1 k_1 v_1 mlp_1 | ...] with q_g head g's D
# columns and mlp_g the g-th 1/H of the MLP width. Any contiguous split into T
# shards (T dividing H) is then whole heads with their own q, k, v and an MLP
# slice: Megatron's column/row parallelism by plain shardings, one layout for
# every mesh. Loaders and exporters convert from/to the checkpoints' contiguous
# layout (:func:`fused_layouts`).


@dataclasses.dataclass(frozen=True)
class HeadGrouped:
    """An axis that holds parts of ``sizes`` (checkpoint order), stored in ``groups`` groups.

    ``groups == 1`` is the contiguous layout itself.
    """

    sizes: tuple[int, ...]
    groups: int

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        if any(n % self.groups for n in self.sizes):
            raise ValueError(f"HeadGrouped: every part of {self.sizes} must split into {self.groups} groups.")

    def _blocks(self) -> list[tuple[int, int]]:
        """``(contiguous start, length)`` of every stored block, in storage order."""
        starts = np.cumsum((0,) + self.sizes[:-1])
        return [(int(start) + g * (n // self.groups), n // self.groups)
                for g in range(self.groups) for start, n in zip(starts, self.sizes)]

    def from_contiguous(self, x: Any, axis: int = -1, concatenate: Callable = np.concatenate) -> Any:
        """Checkpoint (contiguous) layout -> ours along ``axis``: slices and one
        ``concatenate`` (numpy's, jax's or ``lazy_tensors.concatenate``)."""
        return concatenate([_axis_slice(x, axis, a, a + n) for a, n in self._blocks()], axis=axis)

    def to_contiguous(self, x: Any, axis: int = -1, concatenate: Callable = np.concatenate) -> Any:
        """The inverse of :meth:`from_contiguous`."""
        blocks = self._blocks()
        stored = np.cumsum([0] + [n for _, n in blocks])
        order = sorted(range(len(blocks)), key=lambda i: blocks[i][0])
        return concatenate([_axis_slice(x, axis, stored[i], stored[i] + blocks[i][1]) for i in order],
                           axis=axis)

    def group(self, parts: list[jax.Array]) -> jax.Array:
        """Separate parts ``[..., sizes[i]]`` -> ``[..., sum(sizes)]`` in our layout (reshapes: an
        activation sharded by heads stays so)."""
        split = [p.reshape(*p.shape[:-1], self.groups, -1) for p in parts]
        out = jnp.concatenate(split, axis=-1)
        return out.reshape(*out.shape[:-2], -1)


def _axis_slice(x: Any, axis: int, start: int, stop: int) -> Any:
    index = [slice(None)] * x.ndim
    index[axis] = slice(int(start), int(stop))
    return x[tuple(index)]


def fused_layouts(cfg: FluxConfig) -> dict[str, tuple[HeadGrouped, int]]:
    """Our head-grouped parameters (dotted paths) -> ``(layout, axis)``; BFL and
    diffusers checkpoints hold them contiguous (stacked layers lead: axis -1 is
    the output columns of a kernel ``[n, in, out]`` or a bias, -2 its input rows)."""
    h, m, heads = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.num_heads
    qkv, linear1 = HeadGrouped((h, h, h), heads), HeadGrouped((h, h, h, m), heads)
    out = {}
    for stream in ("img", "txt"):
        for leaf in ("kernel", "bias"):
            out[f"double_blocks.{stream}_attn.qkv.{leaf}"] = (qkv, -1)
    for leaf in ("kernel", "bias"):
        out[f"single_blocks.linear1.{leaf}"] = (linear1, -1)
    out["single_blocks.linear2.kernel"] = (HeadGrouped((h, m), heads), -2)
    return out


# ---------------------------------------------------------------------------
# LoRA adapters (peft's LoRA on diffusers' module names).
#
# peft adapts a torch Linear ``W`` as ``W x + (alpha / r) B A x``. Our fused
# linears (BFL's qkv, the single block's linear1) hold several diffusers
# Linears side by side, so each diffusers projection keeps its own A/B pair and
# adds its delta to its slice of the fused output: the adapters are exactly
# peft's and export one to one. Names are peft's target-module suffixes.

# The adaptable diffusers Linears of each block kind, named under their block
# (an adapter's attribute name is ``lora_key(name)``).
DOUBLE_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
SINGLE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
FINAL_LORA_TARGETS = ("proj_out",)  # the transformer's top-level output projection
# Where each block kind's modules live in diffusers' FluxTransformer2DModel.
LORA_PREFIXES = {"double": "transformer_blocks.{}.", "single": "single_transformer_blocks.{}.",
                 "final": ""}
_LORA_TARGETS = {"double": DOUBLE_LORA_TARGETS, "single": SINGLE_LORA_TARGETS,
                 "final": FINAL_LORA_TARGETS}


def lora_key(module: str) -> str:
    """Adapter attribute name of a diffusers module name (``attn.to_out.0`` -> ``attn_to_out_0``)."""
    return module.replace(".", "_")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """Which linears carry adapters, and their rank and scale.

    Attributes:
      rank: r, the inner dimension of every adapter (> 0).
      alpha: peft's ``lora_alpha``; the delta is scaled by ``alpha / rank``.
      targets: peft-style target-module names in diffusers' vocabulary. A
        target matches a module whose full name equals it or ends with
        ``"." + target`` (peft's rule), so ``attn.to_q`` adapts the double and
        the single blocks' ``to_q``.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"model.lora.rank={self.rank!r}: must be an integer >= 1 (0 turns LoRA off).")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r}: must be > 0 (peft's lora_alpha, e.g. 128).")
        if not self.targets:
            raise ValueError("model.lora.targets is empty: name the diffusers modules to adapt, e.g. "
                             f"{list(DOUBLE_LORA_TARGETS)}.")
        unmatched = [t for t in self.targets if not any(self.modules(kind, t) for kind in _LORA_TARGETS)]
        if unmatched:
            supported = sorted(set(DOUBLE_LORA_TARGETS + SINGLE_LORA_TARGETS))
            raise ValueError(f"model.lora.targets {unmatched} match no adaptable FLUX linear: use names "
                             f"from {supported} (peft suffix matching, e.g. 'to_q' or 'attn.to_q').")

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    @staticmethod
    def modules(kind: str, target: str) -> tuple[str, ...]:
        """The ``kind`` block's modules (``double``, ``single``, ``final``) that ``target`` matches."""
        prefix = LORA_PREFIXES[kind].format(0)
        return tuple(m for m in _LORA_TARGETS[kind]
                     if prefix + m == target or (prefix + m).endswith("." + target))

    def adapted(self, kind: str) -> tuple[str, ...]:
        """The ``kind`` block's adapted diffusers modules, in table order."""
        hit = {m for t in self.targets for m in self.modules(kind, t)}
        return tuple(m for m in _LORA_TARGETS[kind] if m in hit)


class Adapters(nnx.Module):
    """The LoRA pairs of one block: ``nnx.LoRA`` per adapted diffusers module.

    ``lora_a [din, r]`` is He-uniform and ``lora_b [r, dout]`` zero (peft's
    ``init_lora_weights=True`` up to A's bound): the model starts exactly at its
    base. Parameters are ``nnx.LoRAParam``, which is how training tells them
    from the frozen base.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], spec: LoraSpec, *, rngs: nnx.Rngs,
                 dtype, param_dtype):
        self.scale = spec.scale
        self.layers = nnx.Dict({
            lora_key(m): nnx.LoRA(din, spec.rank, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for m, (din, dout) in shapes.items()})

    def fused(self, modules: tuple[str, ...], layout: HeadGrouped, x: jax.Array,
              y: jax.Array) -> jax.Array:
        """``y [..., sum(layout.sizes)]`` (a fused linear of ``x``, in ``layout``) plus each
        module's delta on its part."""
        keys = [lora_key(m) for m in modules]
        if not any(k in self.layers for k in keys):
            return y
        parts = [self.scale * self.layers[k](x) if k in self.layers
                 else jnp.zeros(x.shape[:-1] + (size,), y.dtype) for k, size in zip(keys, layout.sizes)]
        return y + layout.group([p.astype(y.dtype) for p in parts])

    def split_input(self, module: str, xs: list[jax.Array], y: jax.Array) -> jax.Array:
        """``y`` plus ``module``'s delta on an input given in pieces ``xs`` (diffusers'
        input order, e.g. the single block's attention output and MLP hidden).

        ``x @ a`` is summed over the pieces' row blocks of ``a``, so no piece is
        concatenated: each keeps its (heads / MLP) sharding, and the sum is a
        rank-sized all-reduce.
        """
        key = lora_key(module)
        if key not in self.layers:
            return y
        layer = self.layers[key]
        *xs, a, b = layer.promote_dtype((*xs, layer.lora_a[...], layer.lora_b[...]), dtype=layer.dtype)
        cuts = np.cumsum([x.shape[-1] for x in xs])[:-1]
        inner = sum(x @ rows for x, rows in zip(xs, jnp.split(a, cuts, axis=0)))
        return y + (self.scale * (inner @ b)).astype(y.dtype)


def _adapters(spec: LoraSpec | None, kind: str, shapes: dict[str, tuple[int, int]], **kw
              ) -> Adapters | None:
    """The ``kind`` block's adapters (None without LoRA or when no target matches it)."""
    adapted = () if spec is None else spec.adapted(kind)
    if not adapted:
        return None
    return Adapters({m: shapes[m] for m in adapted}, spec, **kw)


def _adapt(adapters: Adapters | None, modules: tuple[str, ...], layout: HeadGrouped | int,
           x: jax.Array, y: jax.Array) -> jax.Array:
    """``layout``: the fused output's, or the width of an unfused linear's output."""
    if isinstance(layout, int):
        layout = HeadGrouped((layout,), 1)
    return y if adapters is None else adapters.fused(modules, layout, x, y)


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """Where a diffusers module's adapter delta lands in our weights.

    Attributes:
      linear: our base linear (dotted path under the model).
      part: the module's part of that linear's output columns.
      columns, rows: the layouts of the linear's output and input axes
        (:class:`HeadGrouped`; ``groups == 1`` where not fused).
    """

    linear: str
    part: int
    columns: HeadGrouped
    rows: HeadGrouped

    @property
    def out_features(self) -> int:
        return self.columns.sizes[self.part]


def lora_layout(cfg: FluxConfig) -> dict[tuple[str, str], LoraSite]:
    """``(kind, diffusers module) -> LoraSite``: what a merged export adds
    ``scale * A @ B`` to. ``kind`` indexes :data:`LORA_PREFIXES`; base linears
    are paths under ``double_blocks``/``single_blocks``/the model."""
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    grouped = fused_layouts(cfg)

    def site(linear: str, part: int = 0, width: int = h, rows: int = h) -> LoraSite:
        fused = grouped.get(f"{linear}.kernel")
        columns = fused[0] if fused and fused[1] == -1 else HeadGrouped((width,), 1)
        return LoraSite(linear, part, columns, HeadGrouped((rows,), 1))

    layout = {}
    for stream, (q, k, v, o), ff in (
        ("img", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"), "ff"),
        ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"), "ff_context"),
    ):
        for i, name in enumerate((q, k, v)):
            layout["double", name] = site(f"double_blocks.{stream}_attn.qkv", i)
        layout["double", o] = site(f"double_blocks.{stream}_attn.proj")
        layout["double", f"{ff}.net.0.proj"] = site(f"double_blocks.{stream}_mlp.0", width=m)
        layout["double", f"{ff}.net.2"] = site(f"double_blocks.{stream}_mlp.2", rows=m)
    for i, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        layout["single", name] = site("single_blocks.linear1", i)
    layout["single", "proj_out"] = dataclasses.replace(
        site("single_blocks.linear2"), rows=grouped["single_blocks.linear2.kernel"][0])
    layout["final", "proj_out"] = site("final_layer.linear", width=cfg.out_channels)
    return layout


def lora_shapes(cfg: FluxConfig, kind: str) -> dict[str, tuple[int, int]]:
    """``diffusers module -> (in, out)`` features of ``kind``'s adaptable linears."""
    return {name: (sum(site.rows.sizes), site.out_features)
            for (k, name), site in lora_layout(cfg).items() if k == kind}


# ---------------------------------------------------------------------------
# Modules (names follow BFL so its checkpoints map by identity).


def _linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype, param_dtype,
            use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)


class MLPEmbedder(nnx.Module):
    """``out_layer(silu(in_layer(x)))``."""

    def __init__(self, din: int, dhidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.in_layer = _linear(din, dhidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.out_layer = _linear(dhidden, dhidden, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(nnx.silu(self.in_layer(x)))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (eps 1e-6), fp32 statistics, learned ``scale``."""

    def __init__(self, dim: int, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + 1e-6)
        return (xf * rrms * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)


class QKNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype):
        self.query_norm = RMSNorm(dim, param_dtype=param_dtype)
        self.key_norm = RMSNorm(dim, param_dtype=param_dtype)

    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.query_norm(q), self.key_norm(k)


# Logical axes of the activations (sharding.constrain; mesh axes from
# sharding.activation_rules). The block carries and the fused projections'
# outputs are pinned to their batch rows: left free, XLA's propagation follows
# the FSDP-sharded weights into the activations and moves them (e.g. the fused
# outputs were computed sharded over their features and all-to-all'd back: 1.9
# TB per train step at full size on 8 devices); the row-parallel linears' inputs
# and outputs only under tensor parallelism (_constrain_tensor_parallel).
# "heads" and "mlp" map to the "tensor" mesh axis: with
# mesh.tensor > 1 each device computes its heads and MLP slice (column-parallel
# qkv / linear1 / mlp.0, head-grouped, see HeadGrouped) and the row-parallel
# projections back to TOKENS sum over "tensor" (one all-reduce each).
TOKENS = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", None)  # [B, L, H, per-head features]
HEADS_FLAT = ("batch", "length", "heads")  # [B, L, H x per-head features], head-major
MLP_HIDDEN = ("batch", "length", "mlp")


def _constrain_tensor_parallel(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """``constrain`` where only tensor parallelism needs it (the heads-sharded inputs
    and summed outputs of the row-parallel linears); left to XLA at mesh.tensor == 1,
    where pinning them measured 1.3 TB more per train step at full size on 8 devices
    (more weight gathers and gradient all-reduces than with them free)."""
    return constrain(x, logical) if logical_size("heads") > 1 else x


class SelfAttention(nnx.Module):
    """qkv projection + per-head QK RMSNorm + output projection (attention is joint).

    ``qkv`` is stored head-grouped (:class:`HeadGrouped`): per head its q, k, v.
    """

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.layout = HeadGrouped((h, h, h), cfg.num_heads)
        self.qkv = _linear(h, 3 * h, use_bias=cfg.qkv_bias, rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)
        self.norm = QKNorm(cfg.head_dim, param_dtype=param_dtype)
        self.proj = _linear(h, h, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def qkv_heads(self, x: jax.Array, adapters: Adapters | None = None,
                  modules: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [B, L, hidden]`` -> normed q, k and v, each ``[B, L, H, D]``.

        ``adapters``/``modules``: the block's LoRA and the diffusers names of q, k, v.
        """
        b, length, _ = x.shape
        qkv = _adapt(adapters, modules, self.layout, x, self.qkv(x))
        qkv = constrain(qkv.reshape(b, length, self.num_heads, -1), HEADS)  # [B, L, H, 3D]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k = self.norm(q, k)
        return q, k, v

    def out(self, attn: jax.Array, adapters: Adapters | None, module: str) -> jax.Array:
        """Row-parallel output projection of ``attn [B, L, H x D]`` (heads-sharded) -> tokens."""
        attn = _constrain_tensor_parallel(attn, HEADS_FLAT)
        return _constrain_tensor_parallel(_adapt(adapters, (module,), attn.shape[-1], attn, self.proj(attn)),
                                          TOKENS)


class Modulation(nnx.Module):
    """``lin(silu(vec))`` split into (shift, scale, gate) x (1 or 2)."""

    def __init__(self, dim: int, double: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.multiplier = 6 if double else 3
        self.lin = _linear(dim, self.multiplier * dim, rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        out = self.lin(nnx.silu(vec))[:, None, :]
        return jnp.split(out, self.multiplier, axis=-1)


def _mlp(cfg: FluxConfig, *, rngs, dtype, param_dtype) -> nnx.List:
    # BFL: nn.Sequential(Linear, GELU(tanh), Linear) -> params at .0 and .2
    return nnx.List([
        _linear(cfg.hidden_size, cfg.mlp_hidden_dim, rngs=rngs, dtype=dtype,
                param_dtype=param_dtype),
        None,
        _linear(cfg.mlp_hidden_dim, cfg.hidden_size, rngs=rngs, dtype=dtype,
                param_dtype=param_dtype),
    ])


def _apply_mlp(mlp: nnx.List, x: jax.Array, adapters: Adapters | None = None,
               modules: tuple[str, str] = ("", "")) -> jax.Array:
    """Column-parallel ``mlp.0``, row-parallel ``mlp.2``.

    ``modules``: diffusers names of the two linears (``ff.net.0.proj``, ``ff.net.2``).
    """
    hidden = _adapt(adapters, modules[:1], mlp[0].out_features, x, mlp[0](x))
    hidden = _constrain_tensor_parallel(nnx.gelu(hidden, approximate=True), MLP_HIDDEN)
    return _constrain_tensor_parallel(
        _adapt(adapters, modules[1:], mlp[2].out_features, hidden, mlp[2](hidden)), TOKENS)


class DoubleStreamBlock(nnx.Module):
    """MM-DiT block: separate img/txt weights, joint attention over [txt, img]."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
                 lora: LoraSpec | None = None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        h = cfg.hidden_size
        self.lora = _adapters(lora, "double", lora_shapes(cfg, "double"), **kw)
        self.img_mod = Modulation(h, double=True, **kw)
        self.img_attn = SelfAttention(cfg, **kw)
        self.img_mlp = _mlp(cfg, **kw)
        self.txt_mod = Modulation(h, double=True, **kw)
        self.txt_attn = SelfAttention(cfg, **kw)
        self.txt_mlp = _mlp(cfg, **kw)

    def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array,
                 pe: tuple[jax.Array, jax.Array], attend: Callable[..., jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(
            (1 + i_scale1) * _layer_norm(img) + i_shift1, self.lora, ("attn.to_q", "attn.to_k", "attn.to_v"))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            (1 + t_scale1) * _layer_norm(txt) + t_shift1, self.lora,
            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))

        q = jnp.concatenate([txt_q, img_q], axis=1)
        k = jnp.concatenate([txt_k, img_k], axis=1)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        attn = attend(q, k, v, pe)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img_out = self.img_attn.out(img_attn, self.lora, "attn.to_out.0")
        img = img + i_gate1 * img_out
        img = img + i_gate2 * _apply_mlp(self.img_mlp, (1 + i_scale2) * _layer_norm(img) + i_shift2,
                                         self.lora, ("ff.net.0.proj", "ff.net.2"))
        txt_out = self.txt_attn.out(txt_attn, self.lora, "attn.to_add_out")
        txt = txt + t_gate1 * txt_out
        txt = txt + t_gate2 * _apply_mlp(self.txt_mlp, (1 + t_scale2) * _layer_norm(txt) + t_shift2,
                                         self.lora, ("ff_context.net.0.proj", "ff_context.net.2"))
        return img, txt


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP block on the concatenated [txt, img] sequence."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
                 lora: LoraSpec | None = None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        h = cfg.hidden_size
        self.lora = _adapters(lora, "single", lora_shapes(cfg, "single"), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        # Head-grouped (HeadGrouped): per head its q, k, v and MLP slice in
        # linear1's columns, its attention output and MLP slice in linear2's rows.
        self.layout = HeadGrouped((h, h, h, cfg.mlp_hidden_dim), cfg.num_heads)
        self.linear1 = _linear(h, 3 * h + cfg.mlp_hidden_dim, **kw)
        self.linear2 = _linear(h + cfg.mlp_hidden_dim, h, **kw)
        self.norm = QKNorm(cfg.head_dim, param_dtype=param_dtype)
        self.modulation = Modulation(h, double=False, **kw)

    def __call__(self, x: jax.Array, vec: jax.Array, pe: tuple[jax.Array, jax.Array],
                 attend: Callable[..., jax.Array]) -> jax.Array:
        shift, scale, gate = self.modulation(vec)
        x_mod = (1 + scale) * _layer_norm(x) + shift
        b, length, _ = x.shape
        d = self.head_dim
        h1 = _adapt(self.lora, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), self.layout,
                    x_mod, self.linear1(x_mod))
        h1 = constrain(h1.reshape(b, length, self.num_heads, -1), HEADS)  # [B, L, H, 3D + M/H]
        q, k, v, mlp = jnp.split(h1, [d, 2 * d, 3 * d], axis=-1)
        q, k = self.norm(q, k)
        attn = attend(q, k, v, pe).reshape(b, length, self.num_heads, d)
        mlp = nnx.gelu(mlp, approximate=True)
        hidden = _constrain_tensor_parallel(jnp.concatenate([attn, mlp], axis=-1).reshape(b, length, -1),
                                            HEADS_FLAT)
        out = self.linear2(hidden)
        if self.lora is not None:  # its A's rows are diffusers' [attn | mlp]: fed in those pieces
            out = self.lora.split_input("proj_out", [attn.reshape(b, length, -1), mlp.reshape(b, length, -1)],
                                        out)
        return x + gate * _constrain_tensor_parallel(out, TOKENS)


class LastLayer(nnx.Module):
    """adaLN (shift, scale from silu(vec)) + linear projection to out_channels."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
                 lora: LoraSpec | None = None):
        h = cfg.hidden_size
        self.lora = _adapters(lora, "final", lora_shapes(cfg, "final"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
        # BFL: nn.Sequential(SiLU, Linear) -> params at .1
        self.adaLN_modulation = nnx.List(
            [None, _linear(h, 2 * h, rngs=rngs, dtype=dtype, param_dtype=param_dtype)])
        self.linear = _linear(h, cfg.out_channels, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation[1](nnx.silu(vec)), 2, axis=-1)
        x = (1 + scale[:, None, :]) * _layer_norm(x) + shift[:, None, :]
        return _adapt(self.lora, ("proj_out",), self.linear.out_features, x, self.linear(x))


class FluxTransformer(nnx.Module):
    """The FLUX.1 velocity model ``v(img, t | txt, y, guidance)``.

    Args:
      cfg: hyper-parameters.
      rngs: initialisation randomness.
      dtype: compute dtype (activations and returned velocity).
      param_dtype: parameter dtype.
      remat: recompute each block's activations in the backward pass.
      remat_policy: with ``remat``, which activations are kept (one of
        :data:`REMAT_POLICIES`).
      attention: the attention implementation (one of :data:`ATTENTION_IMPLS`).
      attention_chunk: queries per chunk of ``attention="chunked"``.
      lora: LoRA adapters on the linears it names (``nnx.LoRAParam``; the
        rest is the base), or None.
      scan_unroll: ``unroll`` of the two scans over the blocks (1: a loop,
        compile time independent of depth; True: straight-line code, no
        stacked residual buffers; experiments/results/train_variants.md).
    """

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False,
                 remat_policy: str = "nothing_saveable", attention: str = "einsum",
                 attention_chunk: int = 512, lora: LoraSpec | None = None,
                 scan_unroll: int | bool = 1):
        check_remat_policy(remat_policy)
        check_attention(attention, attention_chunk)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.remat_policy = remat_policy
        self.scan_unroll = scan_unroll
        self.attention = attention
        self.attention_chunk = attention_chunk
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        h = cfg.hidden_size
        self.img_in = _linear(cfg.in_channels, h, rngs=rngs, **kw)
        self.time_in = MLPEmbedder(256, h, rngs=rngs, **kw)
        self.vector_in = MLPEmbedder(cfg.vec_dim, h, rngs=rngs, **kw)
        self.guidance_in = MLPEmbedder(256, h, rngs=rngs, **kw) if cfg.guidance_embed else None
        self.txt_in = _linear(cfg.context_dim, h, rngs=rngs, **kw)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_double(r: nnx.Rngs) -> DoubleStreamBlock:
            return DoubleStreamBlock(cfg, rngs=r, lora=lora, **kw)

        @nnx.split_rngs(splits=cfg.depth_single)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_single(r: nnx.Rngs) -> SingleStreamBlock:
            return SingleStreamBlock(cfg, rngs=r, lora=lora, **kw)

        self.double_blocks = make_double(rngs)
        self.single_blocks = make_single(rngs)
        self.final_layer = LastLayer(cfg, rngs=rngs, lora=lora, **kw)

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.cfg
        chex.assert_rank([img, img_ids, txt, txt_ids, timesteps, y], [3, 3, 3, 3, 1, 2])
        b, n_img = img.shape[:2]
        n_txt = txt.shape[1]
        chex.assert_shape(img, (b, n_img, cfg.in_channels))
        chex.assert_shape(img_ids, (b, n_img, len(cfg.axes_dim)))
        chex.assert_shape(txt, (b, n_txt, cfg.context_dim))
        chex.assert_shape(txt_ids, (b, n_txt, len(cfg.axes_dim)))
        chex.assert_shape(timesteps, (b,))
        chex.assert_shape(y, (b, cfg.vec_dim))
        dt = self.dtype
        heads_split = logical_size("heads")
        if cfg.num_heads % heads_split:
            divisors = [t for t in range(1, cfg.num_heads + 1) if cfg.num_heads % t == 0]
            raise ValueError(
                f"mesh.tensor={heads_split} (sharding.activation_rules 'heads') must divide the transformer's "
                f"num_heads={cfg.num_heads}: tensor parallelism gives each device whole heads. Use mesh.tensor "
                f"in {divisors}.")

        # Activations stay with their batch rows (a no-op outside
        # sharding.activation_sharding): only the FSDP weights move.
        tokens = TOKENS
        x = constrain(self.img_in(img.astype(dt)), tokens)
        vec = self.time_in(timestep_embedding(timesteps, 256).astype(dt))
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("This FLUX model embeds guidance (cfg.guidance_embed=True): "
                                 "pass guidance [B], e.g. jnp.full((B,), 3.5).")
            chex.assert_shape(guidance, (b,))
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).astype(dt))
        vec = vec + self.vector_in(y.astype(dt))
        ctx = constrain(self.txt_in(txt.astype(dt)), tokens)

        pe = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dim,
                              cfg.theta)

        attend = functools.partial(attention, impl=self.attention, chunk=self.attention_chunk)

        def double_body(carry, block: DoubleStreamBlock):
            img_out, txt_out = block(carry[0], carry[1], vec, pe, attend)
            return constrain(img_out, tokens), constrain(txt_out, tokens)

        def single_body(carry, block: SingleStreamBlock):
            return constrain(block(carry, vec, pe, attend), tokens)

        if self.remat:
            policy = getattr(jax.checkpoint_policies, self.remat_policy)
            double_body = nnx.remat(double_body, policy=policy)
            single_body = nnx.remat(single_body, policy=policy)
        x, ctx = nnx.scan(double_body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                          unroll=self.scan_unroll)(
            (x, ctx), self.double_blocks)
        h = constrain(jnp.concatenate([ctx, x], axis=1), tokens)
        h = nnx.scan(single_body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                     unroll=self.scan_unroll)(
            h, self.single_blocks)
        out = self.final_layer(h[:, n_txt:], vec).astype(dt)
        chex.assert_shape(out, (b, n_img, cfg.out_channels))
        return out


# ---------------------------------------------------------------------------
# Weight mapping (checkpoint names -> NNX state paths).


def _put_linear(out: TensorMap, src: SourceTensors, target: str, source: str,
                bias: bool = True) -> None:
    put(out, f"{target}.kernel", f"{source}.weight", _maybe_t(src.take(f"{source}.weight")))
    if bias:
        put(out, f"{target}.bias", f"{source}.bias", src.take(f"{source}.bias"))


def _maybe_t(w: LazyTensor | None) -> LazyTensor | None:
    return None if w is None else linear_kernel(w)


def _put_linear_stacked(out: TensorMap, src: SourceTensors, target: str, source_fmt: str,
                        n: int, bias: bool = True) -> None:
    """``source_fmt`` has ``{}`` for the layer index, e.g. ``double_blocks.{}.img_mod.lin``."""
    put_stacked(out, f"{target}.kernel",
                stack_layers(src, source_fmt + ".weight", n, linear_kernel))
    if bias:
        put_stacked(out, f"{target}.bias", stack_layers(src, source_fmt + ".bias", n))


def _put_fused_stacked(out: TensorMap, src: SourceTensors, target: str,
                       source_fmts: list[str], n: int, bias: bool = True) -> None:
    """Several per-layer torch Linears fused along their output axis (e.g. q, k, v)."""
    label = "[" + ", ".join(f.format("*") for f in source_fmts) + "]"

    def fused(suffix: str, transform) -> tuple[str, np.ndarray] | None:
        parts = [stack_layers(src, f + suffix, n, transform) for f in source_fmts]
        if any(p is None for p in parts):
            return None
        return label + suffix, lazy_tensors.concatenate([p[1] for p in parts], axis=-1)

    put_stacked(out, f"{target}.kernel", fused(".weight", linear_kernel))
    if bias:
        put_stacked(out, f"{target}.bias", fused(".bias", lambda a: a))


def _swap_halves(a: LazyTensor | None) -> LazyTensor | None:
    """diffusers AdaLayerNormContinuous rows are (scale, shift); BFL's are (shift, scale)."""
    if a is None:
        return None
    half = a.shape[0] // 2
    return lazy_tensors.concatenate([a[half:], a[:half]], axis=0)


def map_diffusers(src: SourceTensors, cfg: FluxConfig) -> TensorMap:
    """diffusers ``FluxTransformer2DModel`` state dict -> our NNX state paths (fused
    linears head-grouped, :func:`fused_layouts`)."""
    out: TensorMap = {}
    _put_linear(out, src, "img_in", "x_embedder")
    _put_linear(out, src, "txt_in", "context_embedder")
    tte = "time_text_embed"
    _put_linear(out, src, "time_in.in_layer", f"{tte}.timestep_embedder.linear_1")
    _put_linear(out, src, "time_in.out_layer", f"{tte}.timestep_embedder.linear_2")
    if cfg.guidance_embed:
        _put_linear(out, src, "guidance_in.in_layer", f"{tte}.guidance_embedder.linear_1")
        _put_linear(out, src, "guidance_in.out_layer", f"{tte}.guidance_embedder.linear_2")
    _put_linear(out, src, "vector_in.in_layer", f"{tte}.text_embedder.linear_1")
    _put_linear(out, src, "vector_in.out_layer", f"{tte}.text_embedder.linear_2")

    n, d = cfg.depth, "transformer_blocks.{}"
    t = "double_blocks"
    for stream, mod, q, k, v, o, qn, kn, ff in (
        ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
        ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
         "norm_added_q", "norm_added_k", "ff_context"),
    ):
        _put_linear_stacked(out, src, f"{t}.{stream}_mod.lin", f"{d}.{mod}.linear", n)
        _put_fused_stacked(out, src, f"{t}.{stream}_attn.qkv",
                           [f"{d}.attn.{q}", f"{d}.attn.{k}", f"{d}.attn.{v}"], n,
                           bias=cfg.qkv_bias)
        put_stacked(out, f"{t}.{stream}_attn.norm.query_norm.scale",
                    stack_layers(src, f"{d}.attn.{qn}.weight", n))
        put_stacked(out, f"{t}.{stream}_attn.norm.key_norm.scale",
                    stack_layers(src, f"{d}.attn.{kn}.weight", n))
        _put_linear_stacked(out, src, f"{t}.{stream}_attn.proj", f"{d}.attn.{o}", n)
        _put_linear_stacked(out, src, f"{t}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj", n)
        _put_linear_stacked(out, src, f"{t}.{stream}_mlp.2", f"{d}.{ff}.net.2", n)

    n, s, t = cfg.depth_single, "single_transformer_blocks.{}", "single_blocks"
    _put_fused_stacked(out, src, f"{t}.linear1",
                       [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"], n)
    _put_linear_stacked(out, src, f"{t}.linear2", f"{s}.proj_out", n)
    put_stacked(out, f"{t}.norm.query_norm.scale", stack_layers(src, f"{s}.attn.norm_q.weight", n))
    put_stacked(out, f"{t}.norm.key_norm.scale", stack_layers(src, f"{s}.attn.norm_k.weight", n))
    _put_linear_stacked(out, src, f"{t}.modulation.lin", f"{s}.norm.linear", n)

    w = src.take("norm_out.linear.weight")
    put(out, "final_layer.adaLN_modulation.1.kernel", "norm_out.linear.weight",
        _maybe_t(_swap_halves(w)))
    put(out, "final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias",
        _swap_halves(src.take("norm_out.linear.bias")))
    _put_linear(out, src, "final_layer.linear", "proj_out")
    return _head_grouped(out, cfg)


def _head_grouped(out: TensorMap, cfg: FluxConfig) -> TensorMap:
    """The fused tensors of a contiguous-layout map rearranged into ours (lazily)."""
    for key, (layout, axis) in fused_layouts(cfg).items():
        if key in out:
            source, tensor = out[key]
            out[key] = (source, layout.from_contiguous(tensor, axis, lazy_tensors.concatenate))
    return out


def map_bfl(src: SourceTensors, cfg: FluxConfig) -> TensorMap:
    """Original BFL single-file names (``flux1-dev.safetensors``) -> NNX state paths
    (identical names; the fused linears rearranged head-grouped, :func:`fused_layouts`)."""
    out: TensorMap = {}
    top = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
           "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear",
           "final_layer.adaLN_modulation.1"]
    if cfg.guidance_embed:
        top += ["guidance_in.in_layer", "guidance_in.out_layer"]
    for name in top:
        _put_linear(out, src, name, name)

    for stream in ("img", "txt"):
        for lin in (f"{stream}_mod.lin", f"{stream}_attn.proj", f"{stream}_mlp.0",
                    f"{stream}_mlp.2"):
            _put_linear_stacked(out, src, f"double_blocks.{lin}", f"double_blocks.{{}}.{lin}",
                                cfg.depth)
        _put_linear_stacked(out, src, f"double_blocks.{stream}_attn.qkv",
                            f"double_blocks.{{}}.{stream}_attn.qkv", cfg.depth,
                            bias=cfg.qkv_bias)
        for norm in ("query_norm", "key_norm"):
            name = f"{stream}_attn.norm.{norm}.scale"
            put_stacked(out, f"double_blocks.{name}",
                        stack_layers(src, f"double_blocks.{{}}.{name}", cfg.depth))

    for lin in ("linear1", "linear2", "modulation.lin"):
        _put_linear_stacked(out, src, f"single_blocks.{lin}", f"single_blocks.{{}}.{lin}",
                            cfg.depth_single)
    for norm in ("query_norm", "key_norm"):
        name = f"norm.{norm}.scale"
        put_stacked(out, f"single_blocks.{name}",
                    stack_layers(src, f"single_blocks.{{}}.{name}", cfg.depth_single))
    return _head_grouped(out, cfg)


# ---------------------------------------------------------------------------
# Loading.


def _factory(cfg: FluxConfig, dtype, compute_dtype, remat: bool, remat_policy: str,
             attention: str, attention_chunk: int, lora: LoraSpec | None = None):
    param_dtype = jnp.float32 if dtype is None else dtype
    return lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0), dtype=compute_dtype,
                                   param_dtype=param_dtype, remat=remat,
                                   remat_policy=remat_policy, attention=attention,
                                   attention_chunk=attention_chunk, lora=lora)


def abstract_transformer(
    cfg: FluxConfig, *, dtype: jnp.dtype | None = None, compute_dtype: jnp.dtype = jnp.float32,
    remat: bool = False, remat_policy: str = "nothing_saveable", attention: str = "einsum",
    attention_chunk: int = 512, lora: LoraSpec | None = None,
) -> FluxTransformer:
    """The model with ``ShapeDtypeStruct`` parameters: its graph and shapes, no memory."""
    return nnx.eval_shape(_factory(cfg, dtype, compute_dtype, remat, remat_policy, attention,
                                   attention_chunk, lora))


def diffusers_config(path: str | Path) -> tuple[FluxConfig, Path]:
    """``(config, transformer directory)`` of a diffusers transformer dir or pipeline root."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"No diffusers transformer config: {config_file} does not exist (expected a "
            "FluxTransformer2DModel directory, e.g. <FLUX.1-dev>/transformer).")
    return FluxConfig.from_diffusers(json.loads(config_file.read_text())), path


def load_diffusers(
    path: str | Path,
    *,
    dtype: jnp.dtype | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
    remat: bool = False,
    remat_policy: str = "nothing_saveable",
    attention: str = "einsum",
    attention_chunk: int = 512,
    shardings: ShardingFn | None = None,
) -> FluxTransformer:
    """Loads a diffusers ``FluxTransformer2DModel`` directory.

    Args:
      path: the ``transformer/`` directory (``config.json`` + safetensors, single or
        sharded with ``*.safetensors.index.json``), or a pipeline root holding one.
      dtype: parameter dtype (default fp32; e.g. ``jnp.bfloat16`` for a frozen copy).
      compute_dtype: activation / output dtype.
      remat: rematerialise blocks in the backward pass.
      remat_policy: what ``remat`` keeps (:data:`REMAT_POLICIES`).
      attention, attention_chunk: the attention implementation
        (:data:`ATTENTION_IMPLS`) and the query chunk of ``chunked``.
      shardings: where each parameter is born (``convert.build_model``): each
        device's slice is read from the files straight into its sharding.

    Raises:
      FileNotFoundError: naming the missing ``config.json`` or weights.
      WeightMismatchError: listing every missing, unexpected or mis-shaped tensor.
    """
    cfg, path = diffusers_config(path)
    tensors = open_safetensors(path)
    return load_model(_factory(cfg, dtype, compute_dtype, remat, remat_policy, attention,
                               attention_chunk),
                      lambda src: map_diffusers(src, cfg), tensors,
                      origin=f"diffusers checkpoint {path}", dtype=dtype, shardings=shardings)


_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def load_bfl(
    file: str | Path,
    cfg: FluxConfig,
    *,
    dtype: jnp.dtype | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
    remat: bool = False,
    remat_policy: str = "nothing_saveable",
    attention: str = "einsum",
    attention_chunk: int = 512,
) -> FluxTransformer:
    """Loads an original BFL single-file checkpoint (e.g. ``flux1-dev.safetensors``).

    A ``model.diffusion_model.`` prefix on every key (ComfyUI-style files) is stripped.
    Arguments as in :func:`load_diffusers`; ``cfg`` must describe the checkpoint
    (``FluxConfig.flux_dev()`` for FLUX.1-dev).
    """
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"BFL checkpoint {file} does not exist.")
    tensors = open_safetensors(file)
    for prefix in _BFL_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            break
    return load_model(_factory(cfg, dtype, compute_dtype, remat, remat_policy, attention,
                               attention_chunk),
                      lambda src: map_bfl(src, cfg), tensors,
                      origin=f"BFL checkpoint {file}", dtype=dtype)
