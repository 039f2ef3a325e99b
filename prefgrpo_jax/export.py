"""NNX models -> diffusers / transformers safetensors (the inverse of the loaders).

Two uses:

* a transformer fine-tuned here goes back to PyTorch: :func:`save_transformer`
  writes a diffusers ``FluxTransformer2DModel`` directory (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) that drops into a FLUX.1 snapshot's
  ``transformer/`` folder; :func:`export_flux_bfl` gives the original BFL names;
* a whole pipeline trained here ships as a diffusers FLUX directory:
  :func:`save_pretrained` writes ``model_index.json``, ``transformer/``,
  ``vae/``, ``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5), the two
  tokenizers and ``scheduler/``, readable by our ``FluxPipeline.from_pretrained``
  and by diffusers' ``FluxPipeline.from_pretrained``.

No torch at export time: tensors are numpy arrays written with
``safetensors.numpy`` (bf16 through ``ml_dtypes``). Every ``export_*`` function
is the exact inverse of the matching ``map_*`` loader (``export(load(f)) == f``
tensor for tensor in fp32), and checks that every parameter of the model was
written exactly once, so a renamed or added parameter cannot be silently dropped.

Key sets match what the libraries' own ``save_pretrained`` writes (diffusers
0.42, transformers 5): T5 stores only ``shared.weight`` (``encoder.embed_tokens``
is tied to it), CLIP stores unprefixed names without the ``position_ids``
buffer. Options give the transformers-4 layout (``text_model.`` prefix, the
tied T5 copy) for older readers.

Multi-host: parameters that are not fully addressable on this process are
gathered (``process_allgather``, a collective: call the ``export_*``/``save_*``
functions on every process); files are written by process 0 only.
"""

from __future__ import annotations

import importlib.metadata
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from prefgrpo_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from prefgrpo_jax.models.flux import FluxConfig, FluxTransformer, fused_layouts
from prefgrpo_jax.models.text_encoders import (
    CLIPTextConfig,
    CLIPTextTransformer,
    T5Config,
    T5Encoder,
)

__all__ = [
    "DIFFUSERS_VERSION",
    "TRANSFORMERS_VERSION",
    "ExportError",
    "clip_text_config_json",
    "export_clip_text_hf",
    "export_flux_bfl",
    "export_flux_diffusers",
    "export_t5_hf",
    "export_vae_diffusers",
    "flux_config_json",
    "model_index_json",
    "save_clip_text",
    "save_flux_bfl",
    "save_pretrained",
    "save_t5",
    "save_transformer",
    "save_vae",
    "scheduler_config_json",
    "t5_config_json",
    "vae_config_json",
    "SafetensorsWriter",
    "write_safetensors",
]



def _library_version(name: str, tested: str) -> str:
    """The installed library's version (what it would stamp itself), else the one we test against."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return tested


# Recorded in the config files as the libraries themselves do: the installed
# version when there is one (a fresh install may be newer than the one the
# layout was last checked against), else that one.
DIFFUSERS_VERSION = _library_version("diffusers", "0.42.1")
TRANSFORMERS_VERSION = _library_version("transformers", "5.24.0")

DEFAULT_MAX_SHARD_SIZE = 10 * 2**30  # diffusers' default shard size (10 GB)

_DTYPES = {
    "float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "fp16": np.dtype(np.float16),
}
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}


class ExportError(ValueError):
    """A model cannot be written in the requested format (lists the offenders)."""


# ---------------------------------------------------------------------------
# Generic helpers.


def _resolve_dtype(dtype: Any) -> np.dtype | None:
    """None (keep each parameter's dtype) or a float dtype given as a name, numpy or jnp type."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}.")
        return _DTYPES[dtype]
    resolved = np.dtype(dtype)
    if resolved not in _DTYPE_NAMES:
        raise ValueError(f"dtype {resolved} not supported for export; use float32, bfloat16 "
                         "or float16.")
    return resolved


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


class _Params:
    """A model's parameters by dotted NNX path; records which ones were exported.

    Parameters stay where they are (sharded, on device) until ``get`` brings one
    to the host, and ``put`` casts each output at once: the host never holds the
    fp32 model, only the output in the export dtype plus one tensor in flight.
    With a ``sink`` each output goes there as soon as it is made (the file
    writer), so not even the whole exported model is held.
    """

    def __init__(self, model: nnx.Module, dtype: Any,
                 sink: Callable[[str, np.ndarray], None] | None = None,
                 layouts: Mapping[str, tuple[Any, int]] | None = None):
        _, state = nnx.split(model, nnx.Param)
        # Parameters stored in another layout than the export format's:
        # key -> (layout with to_contiguous, axis); get() returns them contiguous.
        self._layouts = dict(layouts or {})
        self._arrays = {
            ".".join(str(p) for p in path): leaf.get_value()
            for path, leaf in nnx.to_flat_state(state)
        }
        self._dtype = _resolve_dtype(dtype)
        self._used: set[str] = set()
        self._written: set[str] = set()
        self._sink = sink
        self.out: dict[str, np.ndarray] = {}
        self.origin = type(model).__name__

    def keys(self) -> list[str]:
        return sorted(self._arrays)

    def get(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            raise ExportError(f"{self.origin} has no parameter {key!r} (parameters: "
                              f"{sorted(self._arrays)[:20]} ...).")
        self._used.add(key)
        array = _to_numpy(self._arrays[key])
        if key in self._layouts:
            layout, axis = self._layouts[key]
            array = layout.to_contiguous(array, axis)
        return array

    def put(self, name: str, array: np.ndarray) -> None:
        if name in self._written:
            raise ExportError(f"{self.origin}: tensor {name!r} written twice.")
        self._written.add(name)
        if self._dtype is not None and _is_float(array.dtype):
            array = array.astype(self._dtype)
        array = np.ascontiguousarray(array)
        if self._sink is not None:
            self._sink(name, array)
        else:
            self.out[name] = array

    def finish(self) -> dict[str, np.ndarray]:
        unused = sorted(set(self._arrays) - self._used)
        if unused:
            raise ExportError(
                f"{self.origin}: {len(unused)} parameter(s) have no place in the export "
                f"format (a model change the exporter does not know?): {unused}")
        return self.out


def _t(kernel: np.ndarray) -> np.ndarray:
    """Flax Dense kernel [in, out] -> torch Linear weight [out, in]."""
    return kernel.T


def _conv_t(kernel: np.ndarray) -> np.ndarray:
    """Flax Conv kernel [kh, kw, in, out] -> torch Conv2d weight [out, in, kh, kw]."""
    return kernel.transpose(3, 2, 0, 1)


def _swap_halves(a: np.ndarray) -> np.ndarray:
    """(shift, scale) rows <-> (scale, shift) rows (an involution)."""
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def _linear(p: _Params, ours: str, theirs: str, *, bias: bool = True) -> None:
    p.put(f"{theirs}.weight", _t(p.get(f"{ours}.kernel")))
    if bias:
        p.put(f"{theirs}.bias", p.get(f"{ours}.bias"))


def _linear_layers(p: _Params, ours: str, theirs_fmt: str, n: int, *, bias: bool = True) -> None:
    """Unstacks ``ours.kernel [n, in, out]`` into ``theirs_fmt.format(i).weight [out, in]``."""
    kernel = p.get(f"{ours}.kernel")
    b = p.get(f"{ours}.bias") if bias else None
    for i in range(n):
        p.put(f"{theirs_fmt.format(i)}.weight", _t(kernel[i]))
        if bias:
            p.put(f"{theirs_fmt.format(i)}.bias", b[i])


def _split_layers(p: _Params, ours: str, theirs_fmts: list[str], sizes: list[int], n: int,
                  *, bias: bool = True) -> None:
    """Unstacks and splits a fused linear (output axis) into several torch Linears."""
    kernel = p.get(f"{ours}.kernel")
    b = p.get(f"{ours}.bias") if bias else None
    if kernel.shape[-1] != sum(sizes):
        raise ExportError(f"{ours}.kernel has {kernel.shape[-1]} outputs, expected "
                          f"{' + '.join(map(str, sizes))}.")
    cuts = np.cumsum(sizes)[:-1]
    for i in range(n):
        for fmt, w in zip(theirs_fmts, np.split(kernel[i], cuts, axis=-1)):
            p.put(f"{fmt.format(i)}.weight", _t(w))
        if bias:
            for fmt, bb in zip(theirs_fmts, np.split(b[i], cuts, axis=-1)):
                p.put(f"{fmt.format(i)}.bias", bb)


def _vector_layers(p: _Params, ours: str, theirs_fmt: str, n: int) -> None:
    v = p.get(ours)
    for i in range(n):
        p.put(theirs_fmt.format(i), v[i])


def _dtype_name(tensors: Mapping[str, np.ndarray]) -> str:
    for a in tensors.values():
        if np.dtype(a.dtype) in _DTYPE_NAMES:
            return _DTYPE_NAMES[np.dtype(a.dtype)]
    return "float32"


# ---------------------------------------------------------------------------
# FLUX transformer.


def export_flux_diffusers(model: FluxTransformer, *, dtype: Any = None,
                          sink: Callable[[str, np.ndarray], None] | None = None
                          ) -> dict[str, np.ndarray]:
    """Our ``FluxTransformer`` -> diffusers ``FluxTransformer2DModel`` state dict (numpy).

    The inverse of ``flux.map_diffusers``: stacked layers are unstacked, kernels
    transposed to torch's ``[out, in]``, the fused double-stream qkv and the
    single-stream ``linear1`` split into ``to_q/to_k/to_v`` (+ ``proj_mlp``), and
    the final adaLN rows swapped back to diffusers' (scale, shift) order.

    Args:
      model: the transformer (fp32 or bf16 parameters).
      dtype: cast of every floating tensor (``"bfloat16"``, ``np.float32``,
        ``jnp.bfloat16`` ...); None keeps the parameters' dtype.
      sink: receives each ``(name, tensor)`` as soon as it is made (e.g. a
        :class:`SafetensorsWriter`); the returned dict is then empty.

    Raises:
      ValueError: the config has no diffusers equivalent (``mlp_ratio != 4``,
        ``qkv_bias=False`` or ``theta != 10000``).
      ExportError: a parameter has no place in the diffusers layout.
    """
    cfg = model.cfg
    cfg.to_diffusers()  # raises for configs diffusers cannot express
    p = _Params(model, dtype, sink, layouts=fused_layouts(cfg))
    h, mlp = cfg.hidden_size, cfg.mlp_hidden_dim
    _linear(p, "img_in", "x_embedder")
    _linear(p, "txt_in", "context_embedder")
    tte = "time_text_embed"
    _linear(p, "time_in.in_layer", f"{tte}.timestep_embedder.linear_1")
    _linear(p, "time_in.out_layer", f"{tte}.timestep_embedder.linear_2")
    if cfg.guidance_embed:
        _linear(p, "guidance_in.in_layer", f"{tte}.guidance_embedder.linear_1")
        _linear(p, "guidance_in.out_layer", f"{tte}.guidance_embedder.linear_2")
    _linear(p, "vector_in.in_layer", f"{tte}.text_embedder.linear_1")
    _linear(p, "vector_in.out_layer", f"{tte}.text_embedder.linear_2")

    n, d, t = cfg.depth, "transformer_blocks.{}", "double_blocks"
    for stream, mod, q, k, v, o, qn, kn, ff in (
        ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
        ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
         "norm_added_q", "norm_added_k", "ff_context"),
    ):
        _linear_layers(p, f"{t}.{stream}_mod.lin", f"{d}.{mod}.linear", n)
        _split_layers(p, f"{t}.{stream}_attn.qkv",
                      [f"{d}.attn.{q}", f"{d}.attn.{k}", f"{d}.attn.{v}"], [h, h, h], n)
        _vector_layers(p, f"{t}.{stream}_attn.norm.query_norm.scale", f"{d}.attn.{qn}.weight", n)
        _vector_layers(p, f"{t}.{stream}_attn.norm.key_norm.scale", f"{d}.attn.{kn}.weight", n)
        _linear_layers(p, f"{t}.{stream}_attn.proj", f"{d}.attn.{o}", n)
        _linear_layers(p, f"{t}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj", n)
        _linear_layers(p, f"{t}.{stream}_mlp.2", f"{d}.{ff}.net.2", n)

    n, s, t = cfg.depth_single, "single_transformer_blocks.{}", "single_blocks"
    _split_layers(p, f"{t}.linear1",
                  [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"],
                  [h, h, h, mlp], n)
    _linear_layers(p, f"{t}.linear2", f"{s}.proj_out", n)
    _vector_layers(p, f"{t}.norm.query_norm.scale", f"{s}.attn.norm_q.weight", n)
    _vector_layers(p, f"{t}.norm.key_norm.scale", f"{s}.attn.norm_k.weight", n)
    _linear_layers(p, f"{t}.modulation.lin", f"{s}.norm.linear", n)

    # Ours (BFL) is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift).
    p.put("norm_out.linear.weight",
          _swap_halves(_t(p.get("final_layer.adaLN_modulation.1.kernel"))))
    p.put("norm_out.linear.bias", _swap_halves(p.get("final_layer.adaLN_modulation.1.bias")))
    _linear(p, "final_layer.linear", "proj_out")
    return p.finish()


def export_flux_bfl(model: FluxTransformer, *, dtype: Any = None,
                    prefix: str = "") -> dict[str, np.ndarray]:
    """Our ``FluxTransformer`` -> original BFL names (``flux1-dev.safetensors`` layout).

    Our attribute names are BFL's, so this only unstacks the layer axis
    (``double_blocks.{i}.*``, ``single_blocks.{i}.*``), puts the head-grouped
    fused linears back in BFL's contiguous order and writes kernels as torch
    ``weight [out, in]``; RMSNorm ``scale`` keeps its name. ``prefix``
    (e.g. ``"model.diffusion_model."``, ComfyUI) is put before every key.
    The inverse of ``flux.map_bfl`` / ``flux.load_bfl``.
    """
    p = _Params(model, dtype, layouts=fused_layouts(model.cfg))
    stacked = {"double_blocks": model.cfg.depth, "single_blocks": model.cfg.depth_single}
    rename = {"kernel": "weight", "bias": "bias", "scale": "scale"}
    for key in p.keys():
        head, _, rest = key.partition(".")
        base, leaf = key.rsplit(".", 1)
        if leaf not in rename:
            raise ExportError(f"FluxTransformer parameter {key!r} has no BFL name.")
        array = p.get(key)
        if leaf == "kernel":
            array = np.swapaxes(array, -1, -2)
        if head in stacked:
            if array.shape[0] != stacked[head]:
                raise ExportError(f"{key} has {array.shape[0]} layers, config says "
                                  f"{stacked[head]}.")
            sub = rest.rsplit(".", 1)[0]
            for i in range(stacked[head]):
                p.put(f"{prefix}{head}.{i}.{sub}.{rename[leaf]}", array[i])
        else:
            p.put(f"{prefix}{base}.{rename[leaf]}", array)
    return p.finish()


def flux_config_json(cfg: FluxConfig) -> dict[str, Any]:
    """diffusers ``transformer/config.json`` for ``cfg`` (``FluxTransformer2DModel``)."""
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **cfg.to_diffusers()}


# ---------------------------------------------------------------------------
# VAE.

# Our path pieces -> diffusers' (the VAE mirrors diffusers' module tree otherwise).
_VAE_RENAMES = (
    (re.compile(r"\.downsample\.conv\."), ".downsamplers.0.conv."),
    (re.compile(r"\.upsample\.conv\."), ".upsamplers.0.conv."),
    (re.compile(r"\.mid_block\.attention\.to_out\."), ".mid_block.attentions.0.to_out.0."),
    (re.compile(r"\.mid_block\.attention\."), ".mid_block.attentions.0."),
)


def export_vae_diffusers(model: Autoencoder, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """Our ``Autoencoder`` -> diffusers ``AutoencoderKL`` state dict (numpy).

    The inverse of ``autoencoder.map_diffusers``: conv kernels go back to
    ``[out, in, kh, kw]``, the attention projections to ``[out, in]``, GroupNorm
    ``scale`` to ``weight``; ``downsample``/``upsample``/``attention`` become
    ``downsamplers.0``/``upsamplers.0``/``attentions.0`` (``to_out.0``).
    """
    p = _Params(model, dtype)
    for key in p.keys():
        base, leaf = key.rsplit(".", 1)
        name = "." + base + "."
        for pattern, repl in _VAE_RENAMES:
            name = pattern.sub(repl, name)
        name = name.strip(".")
        array = p.get(key)
        if leaf == "kernel":
            if array.ndim == 4:
                array = _conv_t(array)
            elif array.ndim == 2:
                array = _t(array)
            else:
                raise ExportError(f"Autoencoder parameter {key} has unexpected rank {array.ndim}.")
            p.put(f"{name}.weight", array)
        elif leaf == "scale":
            p.put(f"{name}.weight", array)
        elif leaf == "bias":
            p.put(f"{name}.bias", array)
        else:
            raise ExportError(f"Autoencoder parameter {key!r} has no diffusers name.")
    return p.finish()


def vae_config_json(cfg: AutoencoderConfig, *, sample_size: int = 1024) -> dict[str, Any]:
    """diffusers ``vae/config.json`` (``AutoencoderKL``) for ``cfg``.

    ``sample_size`` only sets diffusers' tiling tile size (1024 in FLUX.1).
    """
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": cfg.layers_per_block,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "use_quant_conv": cfg.use_quant_conv,
    }


# ---------------------------------------------------------------------------
# T5 encoder.


def export_t5_hf(model: T5Encoder, *, dtype: Any = None,
                 tied_copy: bool = False) -> dict[str, np.ndarray]:
    """Our ``T5Encoder`` -> transformers ``T5EncoderModel`` state dict (numpy).

    The inverse of ``text_encoders.map_t5_hf``. Like transformers'
    ``save_pretrained`` only ``shared.weight`` is written: ``encoder.embed_tokens``
    is tied to it and transformers (4 and 5) re-ties it on load. ``tied_copy=True``
    also writes ``encoder.embed_tokens.weight`` (the full ``state_dict()`` layout).
    The relative attention bias lives in block 0, as in transformers.
    """
    cfg = model.cfg
    p = _Params(model, dtype)
    shared = p.get("shared.embedding")
    p.put("shared.weight", shared)
    if tied_copy:
        p.put("encoder.embed_tokens.weight", shared)
    p.put("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          p.get("relative_attention_bias.embedding"))
    n, blk = cfg.num_layers, "encoder.block.{}.layer."
    linears = {"q": "0.SelfAttention.q", "k": "0.SelfAttention.k", "v": "0.SelfAttention.v",
               "o": "0.SelfAttention.o"}
    if cfg.is_gated_act:
        linears |= {"wi_0": "1.DenseReluDense.wi_0", "wi_1": "1.DenseReluDense.wi_1"}
    else:
        linears |= {"wi": "1.DenseReluDense.wi"}
    linears["wo"] = "1.DenseReluDense.wo"
    for ours, theirs in linears.items():
        _linear_layers(p, f"blocks.{ours}", blk + theirs, n, bias=False)
    _vector_layers(p, "blocks.attn_norm.scale", blk + "0.layer_norm.weight", n)
    _vector_layers(p, "blocks.ffn_norm.scale", blk + "1.layer_norm.weight", n)
    p.put("encoder.final_layer_norm.weight", p.get("final_layer_norm.scale"))
    return p.finish()


def t5_config_json(cfg: T5Config, *, dtype: str = "float32") -> dict[str, Any]:
    """transformers ``config.json`` of a ``T5EncoderModel`` for ``cfg``.

    ``feed_forward_proj`` is written so that transformers (and ``T5Config.from_hf``)
    parse back the same activation: ``"gated-gelu"`` means gated ``gelu_new``.
    """
    act = cfg.dense_act_fn
    if cfg.is_gated_act:
        if act == "gelu":
            raise ExportError(
                "T5Config(dense_act_fn='gelu', is_gated_act=True) cannot be written: "
                "transformers reads feed_forward_proj='gated-gelu' as the tanh-approximated "
                "'gelu_new'.")
        proj = "gated-gelu" if act == "gelu_new" else f"gated-{act}"
    else:
        proj = act
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": proj,
        "dense_act_fn": act,
        "is_gated_act": cfg.is_gated_act,
        "is_encoder_decoder": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
    }


# ---------------------------------------------------------------------------
# CLIP text tower.

_CLIP_LAYER = (
    # ours (stacked), theirs (per layer), is a Linear kernel
    ("q_proj", "self_attn.q_proj", True),
    ("k_proj", "self_attn.k_proj", True),
    ("v_proj", "self_attn.v_proj", True),
    ("out_proj", "self_attn.out_proj", True),
    ("fc1", "mlp.fc1", True),
    ("fc2", "mlp.fc2", True),
    ("layer_norm1", "layer_norm1", False),
    ("layer_norm2", "layer_norm2", False),
)


def export_clip_text_hf(model: CLIPTextTransformer, *, dtype: Any = None,
                        prefix: str = "") -> dict[str, np.ndarray]:
    """Our ``CLIPTextTransformer`` -> transformers ``CLIPTextModel`` state dict (numpy).

    The inverse of ``text_encoders.map_clip_text_hf``. Names are unprefixed, as
    transformers 5 saves them; ``prefix="text_model."`` gives the transformers-4
    layout (FLUX.1's ``text_encoder``), which transformers 5 also loads. The
    ``position_ids`` buffer is not written (it is non-persistent in both).
    """
    cfg = model.cfg
    p = _Params(model, dtype)
    p.put(f"{prefix}embeddings.token_embedding.weight", p.get("token_embedding.embedding"))
    p.put(f"{prefix}embeddings.position_embedding.weight", p.get("position_embedding.embedding"))
    n, layer = cfg.num_hidden_layers, prefix + "encoder.layers.{}."
    for ours, theirs, is_linear in _CLIP_LAYER:
        if is_linear:
            _linear_layers(p, f"layers.{ours}", layer + theirs, n)
        else:
            _vector_layers(p, f"layers.{ours}.scale", layer + theirs + ".weight", n)
            _vector_layers(p, f"layers.{ours}.bias", layer + theirs + ".bias", n)
    p.put(f"{prefix}final_layer_norm.weight", p.get("final_layer_norm.scale"))
    p.put(f"{prefix}final_layer_norm.bias", p.get("final_layer_norm.bias"))
    return p.finish()


def clip_text_config_json(
    cfg: CLIPTextConfig,
    *,
    dtype: str = "float32",
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """transformers ``config.json`` of a ``CLIPTextModel`` for ``cfg``.

    ``eos_token_id`` comes from ``cfg`` (it selects the pooling rule; FLUX.1's is
    the legacy 2). ``bos_token_id``/``pad_token_id`` are not part of our config:
    pass the tokenizer's (``save_pretrained`` does); None leaves transformers'
    defaults.
    """
    out = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.projection_dim,
        "eos_token_id": cfg.eos_token_id,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
    }
    if bos_token_id is not None:
        out["bos_token_id"] = int(bos_token_id)
    if pad_token_id is not None:
        out["pad_token_id"] = int(pad_token_id)
    return out


# ---------------------------------------------------------------------------
# Writing files.


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: give bytes (int) or e.g. '10GB', '500MB'.")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def _is_writer() -> bool:
    return jax.process_index() == 0


class SafetensorsWriter:
    """Writes tensors as they are handed over, holding at most one shard in memory.

    The result is ``directory/filename`` or, when the tensors exceed
    ``max_shard_size``, ``<stem>-0000i-of-0000n.safetensors`` shards plus
    ``<filename>.index.json`` (the diffusers/transformers sharded layout). A
    full shard goes to disk under a temporary name as soon as the next tensor
    would overflow it; ``close`` names the parts once their count is known.
    FLUX.1-dev's 22 GiB bf16 export thus needs one 10 GB shard of host memory,
    not the whole model. Earlier weight files of the same name (single or
    sharded) are removed first so readers never see a mix. Files carry the
    metadata ``{"format": "pt"}`` that transformers requires. Only the writing
    process (process 0) touches the disk; the others just consume.
    """

    def __init__(self, directory: str | Path, filename: str, *,
                 max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE):
        self.directory = Path(directory)
        self.filename = filename
        self._stem = filename.removesuffix(".safetensors")
        self._limit = _parse_size(max_shard_size)
        self._enabled = _is_writer()
        self._buffer: dict[str, np.ndarray] = {}
        self._buffered = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._total = 0
        self.peak_buffered_bytes = 0  # what the host held at most (tests, logs)
        if self._enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            stale = [self.directory / filename, self.directory / f"{filename}.index.json",
                     *self.directory.glob(f"{self._stem}-*-of-*.safetensors"),
                     *self.directory.glob(f"{self._stem}-part-*.tmp")]
            for f in stale:
                if f.is_file():
                    f.unlink()

    def __call__(self, name: str, array: np.ndarray) -> None:
        if not self._enabled:
            return
        nbytes = int(array.nbytes)
        if self._limit is not None and self._buffer and self._buffered + nbytes > self._limit:
            self._flush()
        self._buffer[name] = array
        self._buffered += nbytes
        self._total += nbytes
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self._buffered)

    def _flush(self) -> None:
        part = self.directory / f"{self._stem}-part-{len(self._parts) + 1:05d}.tmp"
        save_file(self._buffer, str(part), metadata={"format": "pt"})
        self._parts.append((part, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def close(self) -> list[Path]:
        """Writes what is buffered, names the parts (and the index); returns the files."""
        if not self._enabled:
            return []
        if not self._parts:  # everything fit one file: no index, as the libraries write it
            save_file(self._buffer, str(self.directory / self.filename), metadata={"format": "pt"})
            self._buffer, self._buffered = {}, 0
            return [self.directory / self.filename]
        if self._buffer:
            self._flush()
        written, weight_map = [], {}
        for i, (part, keys) in enumerate(self._parts):
            shard = self.directory / f"{self._stem}-{i + 1:05d}-of-{len(self._parts):05d}.safetensors"
            part.replace(shard)
            weight_map.update({k: shard.name for k in keys})
            written.append(shard)
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        index_file = self.directory / f"{self.filename}.index.json"
        index_file.write_text(json.dumps(index, indent=2) + "\n")
        return [*written, index_file]


def write_safetensors(
    tensors: Mapping[str, np.ndarray],
    directory: str | Path,
    filename: str,
    *,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
) -> list[Path]:
    """Writes a dict of tensors through :class:`SafetensorsWriter`; returns the files."""
    writer = SafetensorsWriter(directory, filename, max_shard_size=max_shard_size)
    for name, array in tensors.items():
        writer(name, array)
    return writer.close()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    if not _is_writer():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_transformer(
    model: FluxTransformer,
    directory: str | Path,
    *,
    dtype: Any = None,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Writes a diffusers ``FluxTransformer2DModel`` directory (``config.json`` +
    ``diffusion_pytorch_model.safetensors``): what the training program exports.

    Loadable with ``diffusers.FluxTransformer2DModel.from_pretrained(directory)``
    and ``flux.load_diffusers(directory)``; replaces a FLUX.1 snapshot's
    ``transformer/`` folder.
    """
    directory = Path(directory)
    # Streamed: each tensor leaves the (sharded) model, is cast and lands in the
    # current shard; the host holds one shard, never the whole export.
    writer = SafetensorsWriter(directory, "diffusion_pytorch_model.safetensors",
                               max_shard_size=max_shard_size)
    export_flux_diffusers(model, dtype=dtype, sink=writer)
    writer.close()
    _write_json(directory / "config.json", flux_config_json(model.cfg))
    return directory


def save_flux_bfl(model: FluxTransformer, file: str | Path, *, dtype: Any = None,
                  prefix: str = "") -> Path:
    """Writes one BFL-format safetensors file (e.g. ``flux1-dev.safetensors``)."""
    file = Path(file)
    tensors = export_flux_bfl(model, dtype=dtype, prefix=prefix)
    if _is_writer():
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def save_vae(model: Autoencoder, directory: str | Path, *, dtype: Any = None,
             max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes a diffusers ``AutoencoderKL`` directory."""
    directory = Path(directory)
    tensors = export_vae_diffusers(model, dtype=dtype)
    _write_json(directory / "config.json", vae_config_json(model.cfg))
    write_safetensors(tensors, directory, "diffusion_pytorch_model.safetensors",
                      max_shard_size=max_shard_size)
    return directory


def save_t5(model: T5Encoder, directory: str | Path, *, dtype: Any = None,
            max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes a transformers ``T5EncoderModel`` directory (config.json + model.safetensors)."""
    directory = Path(directory)
    tensors = export_t5_hf(model, dtype=dtype)
    _write_json(directory / "config.json", t5_config_json(model.cfg, dtype=_dtype_name(tensors)))
    write_safetensors(tensors, directory, "model.safetensors", max_shard_size=max_shard_size)
    return directory


def save_clip_text(model: CLIPTextTransformer, directory: str | Path, *, dtype: Any = None,
                   bos_token_id: int | None = None, pad_token_id: int | None = None,
                   max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes a transformers ``CLIPTextModel`` directory (config.json + model.safetensors)."""
    directory = Path(directory)
    tensors = export_clip_text_hf(model, dtype=dtype)
    _write_json(directory / "config.json", clip_text_config_json(
        model.cfg, dtype=_dtype_name(tensors), bos_token_id=bos_token_id,
        pad_token_id=pad_token_id))
    write_safetensors(tensors, directory, "model.safetensors", max_shard_size=max_shard_size)
    return directory


# ---------------------------------------------------------------------------
# The whole pipeline.


def scheduler_config_json(settings: Any) -> dict[str, Any]:
    """diffusers ``scheduler/scheduler_config.json`` (``FlowMatchEulerDiscreteScheduler``)
    from a ``pipeline.SchedulerSettings``; the options our sampler does not
    implement are written at the values it assumes."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        **dataclasses.asdict(settings),
        "invert_sigmas": False,
        "shift_terminal": None,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }


def model_index_json(tokenizer_class: str = "CLIPTokenizer",
                     tokenizer_2_class: str = "T5TokenizerFast") -> dict[str, Any]:
    """diffusers ``model_index.json`` of a ``FluxPipeline``."""
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", tokenizer_class],
        "tokenizer_2": ["transformers", tokenizer_2_class],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_pretrained(
    pipe: Any,
    path: str | Path,
    *,
    dtype: Any = None,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Writes ``pipe`` (a ``pipeline.FluxPipeline``) as a diffusers FLUX directory.

    Layout: ``model_index.json``, ``transformer/`` and ``vae/`` (``config.json``
    + ``diffusion_pytorch_model.safetensors``), ``text_encoder/`` (CLIP) and
    ``text_encoder_2/`` (T5) (``config.json`` + ``model.safetensors``),
    ``tokenizer/`` and ``tokenizer_2/`` (the tokenizers' own ``save_pretrained``)
    and ``scheduler/scheduler_config.json``. Readable by
    ``pipeline.FluxPipeline.from_pretrained`` and ``diffusers.FluxPipeline.from_pretrained``.

    Args:
      pipe: the pipeline; its tokenizers must be transformers tokenizers.
      path: the pipeline root (created; existing component files are overwritten).
      dtype: cast of every floating tensor (e.g. ``"bfloat16"``); None keeps
        each component's parameter dtype.
      max_shard_size: bytes (or ``"10GB"``) above which a component's weights
        are sharded with an index file; None never shards.
    """
    root = Path(path)
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is None or not hasattr(tok, "save_pretrained"):
            raise ExportError(f"pipe.{name} is {type(tok).__name__}: a transformers tokenizer "
                              "(with save_pretrained) is needed to write a FLUX directory.")
    kw = dict(dtype=dtype, max_shard_size=max_shard_size)
    save_transformer(pipe.transformer, root / "transformer", **kw)
    save_vae(pipe.vae, root / "vae", **kw)
    save_clip_text(pipe.text_encoder, root / "text_encoder",
                   bos_token_id=getattr(pipe.tokenizer, "bos_token_id", None),
                   pad_token_id=getattr(pipe.tokenizer, "pad_token_id", None), **kw)
    save_t5(pipe.text_encoder_2, root / "text_encoder_2", **kw)
    if _is_writer():
        pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
        pipe.tokenizer_2.save_pretrained(str(root / "tokenizer_2"))
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler_config_json(pipe.scheduler))
    _write_json(root / "model_index.json", model_index_json(
        type(pipe.tokenizer).__name__, type(pipe.tokenizer_2).__name__))
    return root
