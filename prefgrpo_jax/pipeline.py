"""A diffusers-format FLUX directory as JAX modules: load, encode prompts, sample.

``FluxPipeline.from_pretrained(path)`` reads the layout diffusers writes
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP),
``text_encoder_2/`` (T5), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``).
Prompt encoding and the deterministic Euler sampler follow diffusers'
``FluxPipeline`` exactly (no attention masks on either text encoder, zeros for
text ids, the scheduler's time shift), so the same weights give the same latents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax import convert, sampling, sharding
from prefgrpo_jax.models import autoencoder, flux, text_encoders

COMPONENTS = {
    "transformer": "FluxTransformer2DModel (diffusers)",
    "vae": "AutoencoderKL (diffusers)",
    "text_encoder": "CLIPTextModel (transformers)",
    "text_encoder_2": "T5EncoderModel (transformers)",
    "tokenizer": "CLIPTokenizer (transformers)",
    "tokenizer_2": "T5TokenizerFast (transformers)",
}
LAYOUT_HELP = (
    "Expected a diffusers FLUX directory: model_index.json and the folders "
    + ", ".join(f"{k}/ ({v})" for k, v in COMPONENTS.items())
    + ", optionally scheduler/. `diffusers.FluxPipeline.save_pretrained` or a "
    "downloaded FLUX.1-dev snapshot has this layout."
)


def make_velocity_fn(graphdef: nnx.GraphDef, compute_dtype: Any = None) -> sampling.VelocityFn:
    """``(params, x [B,L,C], t [B], cond) -> v`` for a FLUX transformer graph.

    ``cond`` holds ``img_ids [B,L,3]``, ``txt [B,T,D]``, ``txt_ids [B,T,3]``,
    ``y [B,Dp]`` and, for guidance-distilled models, ``guidance [B]``. Create it
    once and reuse it: it is a static argument of the jitted sampler and step.

    ``compute_dtype`` (e.g. bf16 on fp32 master weights, the reference's
    autocast): floating params are cast first, on their shards, so FSDP gathers
    move half the bytes; gradients flow back to the fp32 masters.

    ``params`` is one state, or a tuple of states merged together: a LoRA
    graph's ``(adapters, frozen base)`` (``prefgrpo_jax.lora``).
    """

    def velocity(params: Any, x: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
        if compute_dtype is not None:
            params = jax.tree.map(
                lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
        if isinstance(params, tuple):
            # Fresh Variables: the frozen base arrives from an outer trace (the
            # jit) than the adapters (the grad), and NNX refuses a module whose
            # Variables belong to different trace levels.
            model = nnx.merge(graphdef, *params, copy=True)
        else:
            model = nnx.merge(graphdef, params)
        return model(
            x, cond["img_ids"], cond["txt"], cond["txt_ids"], t, cond["y"], cond.get("guidance")
        )

    return velocity


def compute_dtype_of(transformer: flux.FluxTransformer) -> Any:
    """The dtype params are cast to for compute; None when it is fp32 (no cast)."""
    return None if jnp.dtype(transformer.dtype) == jnp.float32 else transformer.dtype


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def encode_token_ids(
    clip_graph: nnx.GraphDef, t5_graph: nnx.GraphDef, clip_params: Any, t5_params: Any,
    clip_ids: jax.Array, t5_ids: jax.Array, replicated: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token ids -> ``(txt [B,T,D], txt_ids [B,T,3], pooled [B,Dp])``, fp32.

    ``replicated``: the sharded encoders' weights are gathered to it first
    (``sharding.gather``), so every device layout computes the same numbers.
    """
    clip_params, t5_params = sharding.gather((clip_params, t5_params), replicated)
    # diffusers' FluxPipeline feeds neither encoder an attention mask; padded
    # positions therefore take part, and we match that exactly.
    _, pooled = nnx.merge(clip_graph, clip_params)(clip_ids)
    txt = nnx.merge(t5_graph, t5_params)(t5_ids)
    txt_ids = jnp.zeros((t5_ids.shape[0], t5_ids.shape[1], 3), jnp.float32)
    return txt.astype(jnp.float32), txt_ids, pooled.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    """What diffusers' FlowMatchEulerDiscreteScheduler config means for sigmas."""

    use_dynamic_shifting: bool = True
    shift: float = 3.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_dir(cls, path: Path) -> "SchedulerSettings":
        config_file = path / "scheduler" / "scheduler_config.json"
        if not config_file.is_file():
            return cls()  # FLUX.1-dev's values
        cfg = json.loads(config_file.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def sampler_config(self, num_steps: int, image_seq_len: int, **kwargs) -> sampling.SamplerConfig:
        """SamplerConfig reproducing the scheduler's sigmas for this resolution."""
        if self.use_dynamic_shifting:
            mu = sampling.flux_mu(
                image_seq_len, base_seq_len=self.base_image_seq_len,
                max_seq_len=self.max_image_seq_len, base_shift=self.base_shift,
                max_shift=self.max_shift,
            )
            return sampling.SamplerConfig(num_steps=num_steps, schedule="flux", mu=mu, **kwargs)
        return sampling.SamplerConfig(num_steps=num_steps, schedule="sd3", shift=self.shift, **kwargs)


class FluxPipeline:
    """FLUX text-to-image in JAX: transformer, VAE, CLIP + T5 encoders, tokenizers.

    Attributes:
      transformer: ``FluxTransformer``, callable with BFL's signature.
      vae: ``Autoencoder``; ``vae.decode`` takes NCHW model-space latents.
      text_encoder: CLIP text tower (pooled output -> ``y``).
      text_encoder_2: T5 encoder (hidden states -> ``txt``).
      tokenizer, tokenizer_2: the transformers tokenizers from the directory.
    """

    def __init__(
        self,
        transformer: flux.FluxTransformer,
        vae: autoencoder.Autoencoder,
        text_encoder: text_encoders.CLIPTextTransformer,
        text_encoder_2: text_encoders.T5Encoder,
        tokenizer: Any,
        tokenizer_2: Any,
        *,
        scheduler: SchedulerSettings = SchedulerSettings(),
        max_sequence_length: int = 512,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.max_sequence_length = max_sequence_length
        self.clip_max_length = int(min(getattr(tokenizer, "model_max_length", 77), 77))
        graphdef, _ = nnx.split(transformer)
        self.velocity_compute_dtype = compute_dtype_of(transformer)
        self.velocity_fn = make_velocity_fn(graphdef, self.velocity_compute_dtype)

    # -- loading -------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: jnp.dtype = jnp.float32,
        *,
        remat: bool = False,
        remat_policy: str = "nothing_saveable",
        attention: str = "einsum",
        attention_chunk: int = 512,
        max_sequence_length: int = 512,
        shardings: convert.ShardingFn | None = None,
        transformer_dtype: jnp.dtype | None = None,
        compute_dtype: jnp.dtype = jnp.float32,
        load_transformer: bool = True,
    ) -> "FluxPipeline":
        """Loads a local diffusers-format FLUX directory.

        Args:
          path: the pipeline root (holding ``model_index.json``).
          dtype: parameter dtype of every component (fp32 default; bf16 halves
            memory for frozen parts, see the README for the numerics policy).
          remat: rematerialise transformer blocks in the backward pass.
          remat_policy: what ``remat`` keeps (``flux.REMAT_POLICIES``).
          attention, attention_chunk: the transformer's attention implementation
            (``flux.ATTENTION_IMPLS``) and the query chunk of ``chunked``.
          max_sequence_length: T5 tokens (512 for FLUX.1-dev).
          shardings: where each parameter of every component is born
            (``convert.build_model``); default: the default device.
          transformer_dtype: the transformer's parameter dtype when it differs
            from ``dtype`` (fp32 master weights for training).
          compute_dtype: the transformer's activation dtype (bf16: params cast
            inside jit; the SDE step and log-probs stay fp32).
          load_transformer: False leaves the transformer abstract (shapes only):
            its parameters come from a checkpoint or the caller's train state.

        Raises:
          FileNotFoundError: naming the missing file and the expected layout.
          convert.WeightMismatchError: a component's weights do not fit its config.
        """
        from transformers import AutoTokenizer

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"FLUX pipeline directory {root} does not exist. {LAYOUT_HELP}")
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} has no model_index.json. {LAYOUT_HELP}")
        missing = [f"{name}/" for name in COMPONENTS if not (root / name).is_dir()]
        missing += [
            f"{name}/config.json" for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
            if (root / name).is_dir() and not (root / name / "config.json").is_file()
        ]
        if missing:
            raise FileNotFoundError(f"{root} is missing {', '.join(missing)}. {LAYOUT_HELP}")
        t_dtype = dtype if transformer_dtype is None else transformer_dtype
        if load_transformer:
            transformer = flux.load_diffusers(root / "transformer", dtype=t_dtype, remat=remat,
                                              remat_policy=remat_policy, shardings=shardings,
                                              compute_dtype=compute_dtype, attention=attention,
                                              attention_chunk=attention_chunk)
        else:
            transformer = flux.abstract_transformer(
                flux.diffusers_config(root / "transformer")[0], dtype=t_dtype, remat=remat,
                remat_policy=remat_policy, compute_dtype=compute_dtype, attention=attention,
                attention_chunk=attention_chunk)
        vae = autoencoder.load_diffusers(root / "vae", dtype=dtype, shardings=shardings)
        clip = text_encoders.load_clip_text(root / "text_encoder", dtype=dtype, shardings=shardings)
        t5 = text_encoders.load_t5(root / "text_encoder_2", dtype=dtype, shardings=shardings)
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        tokenizer_2 = AutoTokenizer.from_pretrained(str(root / "tokenizer_2"))
        return cls(
            transformer, vae, clip, t5, tokenizer, tokenizer_2,
            scheduler=SchedulerSettings.from_dir(root),
            max_sequence_length=max_sequence_length,
        )

    def take_transformer_params(self) -> tuple[nnx.GraphDef, Any]:
        """``(graphdef, params)``: the caller (a train state) becomes their only owner.

        The pipeline keeps the transformer abstract (shapes, dtypes, shardings),
        so a run never holds a second copy of it.
        """
        graphdef, params = nnx.split(self.transformer)
        self.transformer = nnx.merge(graphdef, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), params))
        return graphdef, params

    def with_transformer_params(self, params: Any) -> "FluxPipeline":
        """Installs trained ``params`` (e.g. restored from a checkpoint) in the transformer."""
        graphdef, _ = nnx.split(self.transformer)
        self.transformer = nnx.merge(graphdef, params)
        return self

    # -- prompts -------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """CLIP ids ``[B, 77]`` and T5 ids ``[B, max_sequence_length]`` (int32)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        clip_ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.clip_max_length,
            truncation=True, return_tensors="np",
        )["input_ids"]
        t5_ids = self.tokenizer_2(
            list(prompts), padding="max_length", max_length=self.max_sequence_length,
            truncation=True, return_tensors="np",
        )["input_ids"]
        return clip_ids.astype(np.int32), t5_ids.astype(np.int32)

    def encode_prompt(self, prompts: list[str]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(txt [B,T,D], txt_ids [B,T,3], pooled [B,Dp])`` for a list of prompts."""
        clip_ids, t5_ids = self.tokenize(prompts)
        clip_graph, clip_params = nnx.split(self.text_encoder)
        t5_graph, t5_params = nnx.split(self.text_encoder_2)
        return encode_token_ids(
            clip_graph, t5_graph, clip_params, t5_params, jnp.asarray(clip_ids), jnp.asarray(t5_ids),
            sharding.replicated_like((clip_params, t5_params)),
        )

    # -- sampling ------------------------------------------------------------

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae.cfg.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(
                f"height/width ({height}x{width}) must be multiples of {2 * f} "
                "(VAE factor x 2x2 latent packing)"
            )
        return autoencoder.latent_hw(height, width, f)

    def conditioning(
        self, txt: jax.Array, txt_ids: jax.Array, pooled: jax.Array, height: int, width: int,
        guidance_scale: float | None,
    ) -> dict[str, jax.Array]:
        """The ``cond`` pytree of ``make_velocity_fn`` for a batch of prompts."""
        h, w = self.latent_hw(height, width)
        batch = txt.shape[0]
        img_ids = jnp.broadcast_to(autoencoder.latent_image_ids(h, w), (batch, (h // 2) * (w // 2), 3))
        cond = {"img_ids": img_ids, "txt": txt, "txt_ids": txt_ids, "y": pooled}
        if self.transformer.cfg.guidance_embed:
            if guidance_scale is None:
                raise ValueError("this transformer is guidance-distilled: pass guidance_scale (3.5 for FLUX.1-dev)")
            cond["guidance"] = jnp.full((batch,), guidance_scale, jnp.float32)
        return cond

    def generate_latents(
        self,
        prompts: list[str] | None = None,
        *,
        height: int,
        width: int,
        num_inference_steps: int = 28,
        guidance_scale: float | None = 3.5,
        key: jax.Array | None = None,
        latents: jax.Array | None = None,
        prompt_embeds: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Deterministic Euler sampling; returns packed latents ``[B, L, 64]``.

        Give either ``prompts`` or ``prompt_embeds = (txt, txt_ids, pooled)``;
        ``latents`` (packed ``[B, L, 64]``) or ``key`` for the initial noise.
        """
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompts or prompt_embeds")
        txt, txt_ids, pooled = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts)
        cond = self.conditioning(txt, txt_ids, pooled, height, width, guidance_scale)
        h, w = self.latent_hw(height, width)
        latent_shape = ((h // 2) * (w // 2), self.transformer.cfg.in_channels)
        if latents is None and key is None:
            raise ValueError("give key= (initial noise) or latents=")
        config = self.scheduler.sampler_config(
            num_inference_steps, latent_shape[0], mode="ode", group_size=1, init_same_noise=False
        )
        _, params = nnx.split(self.transformer)
        traj = sampling.sample_trajectory(
            self.velocity_fn, config, params,
            key if key is not None else jax.random.key(0), cond, latent_shape, x_init=latents,
        )
        return traj.latents[:, -1]

    def decode(self, packed: jax.Array, height: int, width: int) -> jax.Array:
        """Packed latents ``[B, L, 64]`` -> images ``[B, H, W, 3]`` in [0, 1]."""
        h, w = self.latent_hw(height, width)
        return self.vae.decode(autoencoder.unpack_latents(packed, h, w))

    def __call__(self, prompts: list[str], *, height: int, width: int, **kwargs) -> jax.Array:
        """Text to images ``[B, H, W, 3]`` in [0, 1] (see ``generate_latents``)."""
        packed = self.generate_latents(prompts, height=height, width=width, **kwargs)
        return self.decode(packed, height, width)
