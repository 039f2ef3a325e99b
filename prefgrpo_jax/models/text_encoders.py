"""Text encoders of FLUX in Flax NNX: the T5 v1.1 encoder and the CLIP text tower.

* ``T5Encoder``: what FLUX uses as ``text_encoder_2`` (transformers'
  ``T5EncoderModel``). Returns ``last_hidden_state [B, T, d_model]`` (FLUX's
  ``txt``).
* ``CLIPTextTransformer``: FLUX's ``text_encoder`` (transformers'
  ``CLIPTextModel``). Returns ``(last_hidden_state [B, T, D], pooled [B, D])``;
  ``pooled`` is FLUX's ``vec``.

Both load from transformers ``save_pretrained`` directories (safetensors) via
``load_t5`` / ``load_clip_text``; every tensor name and shape is checked by
``prefgrpo_jax.convert``. The encoder layer of CLIP (``CLIPEncoderLayer``) and
the stacking helpers are shared with the vision tower in ``models/clip.py``.

Layers are stacked: each parameter of a layer stack has a leading layer axis
(created with ``nnx.vmap``, run with ``nnx.scan``), so compile time does not
grow with depth.

Parameters carry no sharding annotations: Flax 0.12 turns an annotation into
eager sharding that needs a mesh at construction time. Shard by state path
instead (e.g. ``blocks.wi_0.kernel`` is ``[layers, d_model, d_ff]``).

Numerics: parameters may be fp32 or bf16 (``dtype=`` of the loaders); layer
norms and attention softmax are computed in fp32 and cast back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prefgrpo_jax import convert
from prefgrpo_jax.convert import (
    SourceTensors,
    TensorMap,
    linear_kernel,
    put,
    put_stacked,
    stack_layers,
)

__all__ = [
    "ACTIVATIONS",
    "CLIPEncoderLayer",
    "CLIPTextConfig",
    "CLIPTextTransformer",
    "T5Config",
    "T5Encoder",
    "attention",
    "clip_text_pooled_index",
    "config_subset",
    "load_clip_text",
    "load_t5",
    "map_clip_encoder_layers",
    "map_clip_text_hf",
    "map_clip_text_into",
    "map_layer_norm",
    "map_t5_hf",
    "read_hf_config",
    "run_stacked",
    "stacked",
    "t5_relative_position_bucket",
]

# ---------------------------------------------------------------------------
# Shared pieces.

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # transformers' ACT2FN names.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


_normal = nnx.initializers.normal(0.02)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    """Creates ``num_layers`` copies of ``make_layer(rngs)`` stacked on a leading axis.

    Every parameter of the result has shape ``[num_layers, ...]``. Run the
    stack with ``run_stacked``.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r: nnx.Rngs):
        return make_layer(r)

    return create(rngs)


def run_stacked(layers: nnx.Module, x: jax.Array, *args: Any) -> jax.Array:
    """Applies a stack from ``stacked`` in order: ``x = layer_i(x, *args)``.

    ``args`` are shared by every layer (masks, position bias).
    """

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h: jax.Array, layer: nnx.Module) -> jax.Array:
        return layer(h, *args)

    return body(x, layers)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Multi-head attention with an fp32 softmax.

    Args:
      q, k, v: ``[B, T, H, Dh]`` (k, v may have another length ``S``).
      scale: multiplier of ``q . k`` (``Dh**-0.5``; 1.0 for T5).
      bias: additive logits bias broadcastable to ``[B, H, T, S]``.
      mask: boolean, broadcastable to ``[B, H, T, S]``; False = not attended.
        Masked logits are set to the fp32 minimum (as transformers does), so a
        fully masked row attends uniformly rather than producing NaN.

    Returns:
      ``[B, T, H, Dh]`` in ``v``'s dtype.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Reads ``config.json`` from a transformers model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"No config.json at {file}; expected a transformers `save_pretrained` directory."
        )
    return json.loads(file.read_text())


def config_subset(cls, config: Mapping[str, Any]) -> dict[str, Any]:
    """The non-null entries of an HF config dict that are fields of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names and v is not None}


# ---------------------------------------------------------------------------
# T5 v1.1 encoder.


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 encoder hyper-parameters (defaults: FLUX's T5-v1.1-XXL ``text_encoder_2``)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> T5Config:
        """From a transformers ``T5Config`` dict (``config.json``).

        ``feed_forward_proj`` is parsed as transformers does: ``"gated-gelu"``
        means a gated FFN with ``gelu_new`` (tanh approximation); ``"relu"`` a
        plain ``wi``/``wo`` FFN with ReLU; ``"gated-<act>"`` gated with ``act``.
        """
        kwargs = config_subset(cls, config)
        kwargs.pop("dense_act_fn", None)
        kwargs.pop("is_gated_act", None)
        proj = config.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={proj!r} is not of the form '<act>' or 'gated-<act>'."
            )
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        _activation(act)
        return cls(**kwargs, dense_act_fn=act, is_gated_act=parts[0] == "gated")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


class T5LayerNorm(nnx.Module):
    """T5's RMS norm: no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return scale * y.astype(scale.dtype)


def t5_relative_position_bucket(
    relative_position: jax.Array, *, num_buckets: int, max_distance: int
) -> jax.Array:
    """Bidirectional T5 bucketing of ``memory_position - query_position``."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # max(rel, 1) only keeps log() finite where the small branch is taken anyway.
    large = max_exact + (
        jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


class T5Block(nnx.Module):
    """One T5 encoder block: pre-norm self-attention, pre-norm (gated) FFN."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.num_heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.is_gated = cfg.is_gated_act
        self.act_name = cfg.dense_act_fn
        d, inner = cfg.d_model, cfg.inner_dim
        lin = functools.partial(nnx.Linear, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = T5LayerNorm(d, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.q = lin(d, inner)
        self.k = lin(d, inner)
        self.v = lin(d, inner)
        self.o = lin(inner, d)
        self.ffn_norm = T5LayerNorm(d, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        if self.is_gated:
            self.wi_0 = lin(d, cfg.d_ff)
            self.wi_1 = lin(d, cfg.d_ff)
        else:
            self.wi = lin(d, cfg.d_ff)
        self.wo = lin(cfg.d_ff, d)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        split = lambda y: y.reshape(b, t, self.num_heads, self.d_kv)
        a = attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                      scale=1.0, bias=bias, mask=mask)
        x = x + self.o(a.reshape(b, t, -1))
        h = self.ffn_norm(x)
        act = _activation(self.act_name)
        if self.is_gated:
            h = act(self.wi_0(h)) * self.wi_1(h)
        else:
            h = act(self.wi(h))
        return x + self.wo(h)


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder stack (transformers' ``T5EncoderModel``), inference only.

    Params: ``shared`` (token embedding), ``relative_attention_bias`` (kept at
    the top level; transformers stores it in block 0 and shares it), ``blocks``
    (stacked), ``final_layer_norm``. Attention logits are not scaled (T5).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        self.shared = nnx.Embed(
            cfg.vocab_size, cfg.d_model, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.initializers.normal(1.0),
        )
        self.relative_attention_bias = nnx.Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=param_dtype,
            rngs=rngs, embedding_init=nnx.initializers.normal(1.0),
        )
        self.blocks = stacked(
            lambda r: T5Block(cfg, rngs=r, param_dtype=param_dtype), cfg.num_layers, rngs
        )
        self.final_layer_norm = T5LayerNorm(
            cfg.d_model, cfg.layer_norm_epsilon, param_dtype=param_dtype
        )

    def position_bias(self, length: int) -> jax.Array:
        """Relative position bias ``[1, H, T, T]`` (fp32) shared by all blocks."""
        pos = jnp.arange(length)
        buckets = t5_relative_position_bucket(
            pos[None, :] - pos[:, None],
            num_buckets=self.cfg.relative_attention_num_buckets,
            max_distance=self.cfg.relative_attention_max_distance,
        )
        values = self.relative_attention_bias.embedding[...][buckets]  # [T, T, H]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``input_ids [B, T]`` int, ``attention_mask [B, T]`` (1 = token, 0 = pad)
        -> ``last_hidden_state [B, T, d_model]`` in the parameter dtype."""
        x = self.shared(input_ids)
        bias = self.position_bias(input_ids.shape[1])
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        x = run_stacked(self.blocks, x, bias, mask)
        return self.final_layer_norm(x)


def map_t5_hf(src: SourceTensors, cfg: T5Config) -> TensorMap:
    """transformers ``T5EncoderModel`` state dict -> ``T5Encoder`` state paths.

    ``encoder.embed_tokens.weight`` is a tied copy of ``shared.weight``: when
    both are present the copy is consumed and ``shared.weight`` used; either
    one alone is accepted.
    """
    out: TensorMap = {}
    if "shared.weight" in src:
        put(out, "shared.embedding", "shared.weight", src.take("shared.weight"))
        src.maybe("encoder.embed_tokens.weight")
    elif "encoder.embed_tokens.weight" in src:
        name = "encoder.embed_tokens.weight"
        put(out, "shared.embedding", name, src.take(name))
    else:
        src.take("shared.weight")  # records it as missing
    rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    put(out, "relative_attention_bias.embedding", rel, src.take(rel))

    n = cfg.num_layers
    blk = "encoder.block.{}.layer."
    linears = {"q": "0.SelfAttention.q", "k": "0.SelfAttention.k", "v": "0.SelfAttention.v",
               "o": "0.SelfAttention.o"}
    if cfg.is_gated_act:
        linears |= {"wi_0": "1.DenseReluDense.wi_0", "wi_1": "1.DenseReluDense.wi_1"}
    else:
        linears |= {"wi": "1.DenseReluDense.wi"}
    linears["wo"] = "1.DenseReluDense.wo"
    for ours, theirs in linears.items():
        put_stacked(out, f"blocks.{ours}.kernel",
                    stack_layers(src, blk + theirs + ".weight", n, linear_kernel))
    put_stacked(out, "blocks.attn_norm.scale", stack_layers(src, blk + "0.layer_norm.weight", n))
    put_stacked(out, "blocks.ffn_norm.scale", stack_layers(src, blk + "1.layer_norm.weight", n))
    name = "encoder.final_layer_norm.weight"
    put(out, "final_layer_norm.scale", name, src.take(name))
    return out


def load_t5(path: str | Path, *, dtype=None, config: T5Config | None = None,
            shardings: convert.ShardingFn | None = None) -> T5Encoder:
    """Loads a transformers ``T5EncoderModel`` directory (config.json + safetensors).

    Args:
      path: e.g. ``<flux>/text_encoder_2``.
      dtype: cast of the parameters (e.g. ``jnp.bfloat16``); default fp32.
      config: overrides ``config.json``.
      shardings: where each parameter is born (``convert.build_model``).

    Raises:
      WeightMismatchError: listing every missing, unexpected or mis-shaped tensor.
    """
    cfg = config or T5Config.from_hf(read_hf_config(path))
    tensors = convert.open_safetensors(path)
    return convert.load_model(
        lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)),
        lambda src: map_t5_hf(src, cfg),
        tensors,
        origin=str(path),
        dtype=dtype,
        shardings=shardings,
    )


# ---------------------------------------------------------------------------
# CLIP encoder layer (shared by the text and vision towers) and text tower.


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer layer of CLIP (text and vision): attention + MLP, with biases."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        hidden_act: str,
        layer_norm_eps: float,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads.")
        _activation(hidden_act)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.hidden_act = hidden_act
        d = hidden_size
        lin = functools.partial(nnx.Linear, param_dtype=param_dtype, rngs=rngs)
        ln = functools.partial(
            nnx.LayerNorm, d, epsilon=layer_norm_eps, param_dtype=param_dtype, rngs=rngs,
        )
        self.layer_norm1 = ln()
        self.q_proj = lin(d, d)
        self.k_proj = lin(d, d)
        self.v_proj = lin(d, d)
        self.out_proj = lin(d, d)
        self.layer_norm2 = ln()
        self.fc1 = lin(d, intermediate_size)
        self.fc2 = lin(intermediate_size, d)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``x [B, T, D]``; ``mask`` boolean broadcastable to ``[B, H, T, T]`` or None."""
        b, t, _ = x.shape
        h = self.layer_norm1(x)
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        a = attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)),
                      scale=self.head_dim**-0.5, mask=mask)
        x = x + self.out_proj(a.reshape(b, t, -1))
        h = self.fc2(_activation(self.hidden_act)(self.fc1(self.layer_norm2(x))))
        return x + h


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower hyper-parameters.

    Defaults are transformers 5's ``CLIPTextConfig`` defaults (used for keys a
    config.json leaves out). Note ``eos_token_id``: FLUX's (and OpenAI's
    original) configs say 2, which selects the legacy pooling rule (argmax of
    the token ids); see ``clip_text_pooled_index``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """From a ``CLIPTextConfig`` dict, or a ``CLIPConfig`` dict (its ``text_config``)."""
        if "text_config" in config:
            config = config["text_config"] or {}
        return cls(**config_subset(cls, config))


def clip_text_pooled_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose hidden state is CLIP's pooled output, ``[B]``.

    transformers' rule: with the legacy ``eos_token_id == 2`` the position of the
    largest token id (the original vocab's EOS is its last id); otherwise the
    first position holding ``eos_token_id``.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nnx.Module):
    """CLIP text tower (transformers' ``CLIPTextModel``), causal, inference only."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        d = cfg.hidden_size
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, d, param_dtype=param_dtype, rngs=rngs,
            embedding_init=_normal,
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, d, param_dtype=param_dtype, rngs=rngs,
            embedding_init=_normal,
        )
        self.layers = stacked(
            lambda r: CLIPEncoderLayer(
                d, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_act,
                cfg.layer_norm_eps, rngs=r, param_dtype=param_dtype,
            ),
            cfg.num_hidden_layers,
            rngs,
        )
        self.final_layer_norm = nnx.LayerNorm(
            d, epsilon=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``input_ids [B, T]`` (T <= max_position_embeddings), optional padding
        ``attention_mask [B, T]`` -> ``(last_hidden_state [B, T, D], pooled [B, D])``."""
        t = input_ids.shape[1]
        if t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"Sequence length {t} exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}; truncate when tokenizing."
            )
        x = self.token_embedding(input_ids) + self.position_embedding.embedding[...][:t]
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].astype(bool)
        x = run_stacked(self.layers, x, mask)
        x = self.final_layer_norm(x)
        idx = clip_text_pooled_index(input_ids, self.cfg.eos_token_id)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return x, pooled


_CLIP_LAYER_PARAMS = {
    # ours: theirs (Linear weights get transposed)
    "q_proj.kernel": "self_attn.q_proj.weight",
    "q_proj.bias": "self_attn.q_proj.bias",
    "k_proj.kernel": "self_attn.k_proj.weight",
    "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.kernel": "self_attn.v_proj.weight",
    "v_proj.bias": "self_attn.v_proj.bias",
    "out_proj.kernel": "self_attn.out_proj.weight",
    "out_proj.bias": "self_attn.out_proj.bias",
    "layer_norm1.scale": "layer_norm1.weight",
    "layer_norm1.bias": "layer_norm1.bias",
    "fc1.kernel": "mlp.fc1.weight",
    "fc1.bias": "mlp.fc1.bias",
    "fc2.kernel": "mlp.fc2.weight",
    "fc2.bias": "mlp.fc2.bias",
    "layer_norm2.scale": "layer_norm2.weight",
    "layer_norm2.bias": "layer_norm2.bias",
}


def map_clip_encoder_layers(
    src: SourceTensors, out: TensorMap, *, src_prefix: str, dst_prefix: str, num_layers: int
) -> None:
    """Maps ``{src_prefix}encoder.layers.{i}.*`` onto the stacked ``{dst_prefix}layers.*``."""
    for ours, theirs in _CLIP_LAYER_PARAMS.items():
        fmt = f"{src_prefix}encoder.layers.{{}}.{theirs}"
        transform = linear_kernel if ours.endswith(".kernel") else (lambda a: a)
        put_stacked(out, f"{dst_prefix}layers.{ours}",
                    stack_layers(src, fmt, num_layers, transform))


def map_layer_norm(src: SourceTensors, out: TensorMap, source: str, target: str) -> None:
    put(out, f"{target}.scale", f"{source}.weight", src.take(f"{source}.weight"))
    put(out, f"{target}.bias", f"{source}.bias", src.take(f"{source}.bias"))


def map_clip_text_into(
    src: SourceTensors, out: TensorMap, cfg: CLIPTextConfig, *, src_prefix: str, dst_prefix: str
) -> None:
    """Maps a CLIP text tower under ``src_prefix`` onto ours under ``dst_prefix``."""
    p = src_prefix
    for ours, theirs in (("token_embedding", "token_embedding"),
                         ("position_embedding", "position_embedding")):
        name = f"{p}embeddings.{theirs}.weight"
        put(out, f"{dst_prefix}{ours}.embedding", name, src.take(name))
    src.maybe(f"{p}embeddings.position_ids")  # a buffer some checkpoints carry
    map_clip_encoder_layers(src, out, src_prefix=p, dst_prefix=dst_prefix,
                            num_layers=cfg.num_hidden_layers)
    map_layer_norm(src, out, f"{p}final_layer_norm", f"{dst_prefix}final_layer_norm")


def map_clip_text_hf(src: SourceTensors, cfg: CLIPTextConfig) -> TensorMap:
    """transformers ``CLIPTextModel`` state dict -> ``CLIPTextTransformer`` paths.

    Accepts both layouts: ``text_model.*`` (transformers 4 saves, e.g. FLUX.1's
    ``text_encoder``) and unprefixed (transformers 5 saves).
    """
    prefix = "text_model." if any(k.startswith("text_model.") for k in src.keys()) else ""
    out: TensorMap = {}
    map_clip_text_into(src, out, cfg, src_prefix=prefix, dst_prefix="")
    return out


def load_clip_text(
    path: str | Path, *, dtype=None, config: CLIPTextConfig | None = None,
    shardings: convert.ShardingFn | None = None,
) -> CLIPTextTransformer:
    """Loads a transformers ``CLIPTextModel`` directory (e.g. ``<flux>/text_encoder``).

    Raises:
      WeightMismatchError: listing every missing, unexpected or mis-shaped tensor.
    """
    cfg = config or CLIPTextConfig.from_hf(read_hf_config(path))
    tensors = convert.open_safetensors(path)
    return convert.load_model(
        lambda: CLIPTextTransformer(cfg, rngs=nnx.Rngs(0)),
        lambda src: map_clip_text_hf(src, cfg),
        tensors,
        origin=str(path),
        dtype=dtype,
        shardings=shardings,
    )
