"""LoRA training state: frozen base, trainable adapters, peft-format export.

With ``model.lora.rank > 0`` the transformer is built with ``flux.LoraSpec``
adapters (``nnx.LoRA`` pairs, ``nnx.LoRAParam``) and split three ways::

    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)

Only ``adapters`` (fp32) are trained, optimised and checkpointed; ``base`` is
the pretrained transformer, loaded once in ``model.dtype`` and sharded by the
same rules, and never copied. The velocity function takes ``(adapters, base)``
and merges them per call (``pipeline.make_velocity_fn``); the KL reference is
the same model with zero adapters (``B A = 0``: exactly the base, bitwise).

Exports are peft's: ``pytorch_lora_weights.safetensors`` with
``transformer.<diffusers module>.lora_A.weight [r, in]`` /
``lora_B.weight [out, r]`` and the adapter config in the file's
``lora_adapter_metadata`` header (what ``FluxPipeline.save_lora_weights``
writes, so ``FluxPipeline.load_lora_weights`` reads rank and alpha from it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax.models import flux

# peft's init_lora_weights values we reproduce: True (Kaiming-uniform A with
# a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and "gaussian" (A ~ N(0, 1/r));
# B = 0 in both, so training starts at the base model.
INITS = ("default", "gaussian")
# The reference's lora_target_modules (CodeGoat24/Pref-GRPO, train_flux*.py with
# --use_lora): attention projections of both streams and both feed-forward nets
# of every double block; by peft's suffix rule "attn.to_q/k/v" also adapt the
# single blocks' q/k/v.
REFERENCE_TARGETS = flux.DOUBLE_LORA_TARGETS
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def split(model: flux.FluxTransformer) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, adapters, base)`` of a transformer built with LoRA."""
    return nnx.split(model, nnx.LoRAParam, ...)


def abstract_model(base: flux.FluxTransformer, spec: flux.LoraSpec) -> flux.FluxTransformer:
    """``base``'s architecture and settings with ``spec``'s adapters, shapes only."""
    return flux.abstract_transformer(
        base.cfg, dtype=jnp.float32, compute_dtype=base.dtype, remat=base.remat,
        remat_policy=base.remat_policy, attention=base.attention,
        attention_chunk=base.attention_chunk, lora=spec)


def init_adapters(abstract: Any, key: jax.Array, init: str = "default", shardings: Any = None) -> Any:
    """Fresh adapters shaped like ``abstract`` (an ``nnx.State`` of ``LoRAParam``s).

    ``lora_a [..., in, r]`` by ``init`` (:data:`INITS`), ``lora_b`` zero; each
    leaf's key is ``fold_in(key, its index in path order)``, so the draw does
    not depend on the device layout. Born in ``shardings`` when given.
    """
    if init not in INITS:
        raise ValueError(f"model.lora.init={init!r}: must be one of {INITS}")
    flat = sorted(nnx.to_flat_state(abstract), key=lambda kv: kv[0])

    def make():
        leaves = []
        for i, (path, var) in enumerate(flat):
            shape, dtype = var.shape, var.dtype
            if path[-1] == "lora_b":
                value = jnp.zeros(shape, dtype)
            elif init == "gaussian":
                value = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) / shape[-1]
            else:
                bound = 1.0 / np.sqrt(shape[-2])
                value = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound)
            leaves.append((path, var.replace(value.astype(dtype))))
        return nnx.from_flat_state(leaves)

    return jax.jit(make, out_shardings=shardings)()


def zero_adapters(adapters: Any) -> Any:
    """The adapters switched off: every leaf zero (the model is then its base)."""
    return jax.tree.map(jnp.zeros_like, adapters)


def _flat(adapters: Any) -> dict[str, Any]:
    return {".".join(str(p) for p in path): var.get_value() if hasattr(var, "get_value") else var
            for path, var in nnx.to_flat_state(adapters)}


def _blocks(spec: flux.LoraSpec) -> list[tuple[str, str, str]]:
    """``(kind, our block path, diffusers module)`` of every adapted module."""
    paths = {"double": "double_blocks", "single": "single_blocks", "final": "final_layer"}
    return [(kind, paths[kind], module) for kind in flux.LORA_PREFIXES for module in spec.adapted(kind)]


def _layers(kind: str, cfg: flux.FluxConfig) -> list[int | None]:
    """Layer indices of a stacked block kind; ``[None]`` for the unstacked final layer."""
    return {"double": list(range(cfg.depth)), "single": list(range(cfg.depth_single))}.get(kind, [None])


def peft_tensors(adapters: Any, cfg: flux.FluxConfig, spec: flux.LoraSpec, *, dtype: Any = np.float32
                 ) -> dict[str, np.ndarray]:
    """diffusers/peft LoRA state dict (``transformer.``-prefixed) of our adapters.

    Ours are ``x @ a @ b`` with ``a [in, r]``, ``b [r, out]``; torch's are
    ``B(A(x))`` with ``A.weight [r, in]``, ``B.weight [out, r]``: transposes.
    """
    from prefgrpo_jax import export

    flat = _flat(adapters)
    out = {}
    for kind, ours, module in _blocks(spec):
        base = f"{ours}.lora.layers.{flux.lora_key(module)}"
        a, b = (export._to_numpy(flat[f"{base}.{n}"]).astype(np.float32) for n in ("lora_a", "lora_b"))
        for layer in _layers(kind, cfg):
            la, lb = (a, b) if layer is None else (a[layer], b[layer])
            name = "transformer." + flux.LORA_PREFIXES[kind].format(layer) + module
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(la.T).astype(dtype)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(lb.T).astype(dtype)
    return out


def peft_metadata(cfg: flux.FluxConfig, spec: flux.LoraSpec) -> dict[str, Any]:
    """peft ``LoraConfig`` kwargs, ``transformer.``-prefixed as diffusers packs them.

    ``target_modules`` lists every adapted module by its full name, so peft
    adapts exactly those whatever its matching rules.
    """
    modules = sorted(flux.LORA_PREFIXES[kind].format(layer) + module
                     for kind, _, module in _blocks(spec) for layer in _layers(kind, cfg))
    config = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": modules,
              "init_lora_weights": True, "bias": "none", "lora_dropout": 0.0}
    return {f"transformer.{k}": v for k, v in config.items()}


def save_peft(adapters: Any, cfg: flux.FluxConfig, spec: flux.LoraSpec, directory: str | Path, *,
              dtype: Any = "float32") -> Path:
    """Writes ``directory/pytorch_lora_weights.safetensors`` (peft format, metadata included).

    ``diffusers.FluxPipeline.load_lora_weights(directory)`` loads it. Returns the file.
    """
    from safetensors.numpy import save_file

    from prefgrpo_jax import export

    directory = Path(directory)
    tensors = peft_tensors(adapters, cfg, spec, dtype=export._resolve_dtype(dtype) or np.float32)
    if export._is_writer():
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt",
                    METADATA_KEY: json.dumps(peft_metadata(cfg, spec), indent=2, sort_keys=True)}
        save_file(tensors, str(directory / WEIGHT_NAME), metadata=metadata)
    return directory / WEIGHT_NAME


def merged_params(base: Any, adapters: Any, cfg: flux.FluxConfig, spec: flux.LoraSpec) -> Any:
    """``base`` with every adapter folded in: ``W += scale * a @ b`` on the adapter's
    part (fp32 sum, cast back to the base dtype), placed by ``flux.lora_layout``
    (head-grouped fused linears included). The result is a plain transformer's
    params, in ``base``'s shardings (one jitted program: no full-size copy on one
    device)."""
    layout = flux.lora_layout(cfg)
    targets: dict[str, list[tuple[flux.LoraSite, str]]] = {}
    for kind, ours, module in _blocks(spec):
        site = layout[kind, module]
        targets.setdefault(f"{site.linear}.kernel", []).append(
            (site, f"{ours}.lora.layers.{flux.lora_key(module)}"))

    def delta(value: jax.Array, sites: list[tuple[flux.LoraSite, str]], flat_adapters: dict) -> jax.Array:
        """The summed fp32 delta of one base kernel ``[(layers,) in, out]``, in its layout."""
        site = sites[0][0]
        parts: list[jax.Array | None] = [None] * len(site.columns.sizes)
        for s, key in sites:
            parts[s.part] = spec.scale * jnp.matmul(flat_adapters[f"{key}.lora_a"].astype(jnp.float32),
                                                    flat_adapters[f"{key}.lora_b"].astype(jnp.float32))
        parts = [jnp.zeros(value.shape[:-1] + (n,), jnp.float32) if p is None else p
                 for p, n in zip(parts, site.columns.sizes)]
        contiguous = jnp.concatenate(parts, axis=-1)  # [..., in (diffusers rows), out (contiguous)]
        grouped = site.columns.from_contiguous(contiguous, -1, jnp.concatenate)
        return site.rows.from_contiguous(grouped, -2, jnp.concatenate)

    @jax.jit
    def fold(base, adapters):
        flat_adapters = _flat(adapters)
        leaves = []
        for path, var in nnx.to_flat_state(base):
            value = var.get_value()
            sites = targets.get(".".join(str(p) for p in path))
            if sites:
                value = (value.astype(jnp.float32) + delta(value, sites, flat_adapters)).astype(value.dtype)
            leaves.append((path, var.replace(value)))
        return nnx.from_flat_state(leaves)

    return fold(base, adapters)


def merged_model(base_model: flux.FluxTransformer, adapters: Any, spec: flux.LoraSpec
                 ) -> flux.FluxTransformer:
    """A plain (adapter-free) transformer with ``adapters`` merged into ``base_model``'s weights."""
    graphdef, base = nnx.split(base_model)
    return nnx.merge(graphdef, merged_params(base, adapters, base_model.cfg, spec))


__all__ = [
    "INITS", "REFERENCE_TARGETS", "WEIGHT_NAME", "abstract_model", "init_adapters",
    "merged_model", "merged_params", "peft_metadata", "peft_tensors", "save_peft",
    "split", "zero_adapters",
]
