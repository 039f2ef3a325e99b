"""The toy world's base model: toy-size FLUX components and their pretraining.

What ``experiments/toyworld/pretrain.py`` assembles into the shipped
``toyworld/assets/base`` (a diffusers-format FLUX directory):

* **Tokenizers** (``save_tokenizers``): a CLIP BPE and a T5 Unigram tokenizer
  trained on the training prompts of the toy grammar, every word one token,
  ``model_max_length = MAX_SEQUENCE_LENGTH`` (16; the longest prompt is 10 CLIP
  / 9 T5 tokens).
* **Text encoders** (``init_text_encoders``): a 2-layer T5 encoder and a
  2-layer CLIP text tower at width 32, *randomly initialised* with a fixed
  seed and frozen: the transformer learns to read their features (a random
  transformer is an injective-enough hash of the token sequence;
  ``text_feature_report`` measures how far apart the prompts' features are).
  CLIP's token embeddings are drawn with std 1 (not 0.02) and the EOS
  token's is zero, so that the pooled vector (the final state at EOS) is made
  of what attention gathers from the prompt's tokens rather than of the EOS
  embedding itself: this brings the mean cosine similarity between different
  prompts' pooled vectors from about 0.9 down to about 0.5.
* **VAE** (``vae_config``, ``train_vae``): a FLUX-style ``AutoencoderKL`` with
  16 latent channels and three levels (``block_out_channels=(16, 32, 32)``,
  4x downsampling): 32x32 images -> 8x8x16 latents -> 16 tokens of 64 after
  2x2 packing. Trained on rendered scenes of all prompts (an image codec; see
  ``train_vae``) with an L2 + L1
  reconstruction loss on posterior samples plus a small KL term; its
  ``shift_factor``/``scaling_factor`` are then set so model-space latents have
  zero mean and unit variance (``calibrate_vae``), as FLUX's are.
* **Transformer** (``flux_config``, ``train_flow``): ``FluxTransformer`` at
  hidden 96, 2 heads, 2 double + 2 single blocks, ``guidance_embed=False`` (no
  guidance distillation: there is no teacher to distil from; the pipeline
  then ignores ``guidance_scale``). Trained with the rectified-flow loss
  ``|| v(x_t, t) - (noise - x0) ||^2``, ``x_t = (1 - t) x0 + t noise``, t
  from SD3's logit-normal (``sigmoid(N(0, 1))``), on VAE latents of freshly
  rendered scenes of training prompts, conditioned on the frozen encoders'
  features of the prompt (``txt`` from T5 padded to 16 tokens, ``y`` pooled
  CLIP, exactly what ``FluxPipeline.encode_prompt`` computes at
  ``max_sequence_length=16``). Stopped early on purpose (see the assets'
  README for the measured verifier scores).

All training steps are jitted pure functions of ``(params, opt_state, batch,
key)`` (``nnx.split`` once, ``nnx.merge`` inside); every random draw derives
from one seed, so a rerun on the same machine reproduces the assets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefgrpo_jax import sampling
from prefgrpo_jax.models import autoencoder, flux, text_encoders
from prefgrpo_jax.toyworld import scenes
from prefgrpo_jax.toyworld.render import render_batch
from prefgrpo_jax.toyworld.tokenizers import save_clip_tokenizer, save_t5_tokenizer
from prefgrpo_jax.toyworld.verify import score_table, verify

IMAGE_SIZE = 32
MAX_SEQUENCE_LENGTH = 16  # T5 tokens the pipeline pads to; also CLIP's model_max_length
CLIP_VOCAB = 600
T5_VOCAB = 256
TEXT_DIM = 32

Log = Callable[[str], None]


# ---------------------------------------------------------------------------
# Tokenizers and text encoders.


def corpus() -> list[str]:
    """Tokenizer training text: every training prompt of every dimension."""
    return [p.text for d in scenes.DIMENSIONS for p in scenes.prompt_pool(d, "train")]


def save_tokenizers(root: str | Path) -> tuple[Path, Path]:
    """Trains the toy CLIP and T5 tokenizers into ``root/tokenizer{,_2}``.

    Checks that every prompt of the grammar (held-out ones included) is one
    token per word and fits ``MAX_SEQUENCE_LENGTH``.
    """
    from transformers import AutoTokenizer

    root = Path(root)
    clip_dir, t5_dir = root / "tokenizer", root / "tokenizer_2"
    text = corpus()
    save_clip_tokenizer(clip_dir, vocab_size=CLIP_VOCAB, model_max_length=MAX_SEQUENCE_LENGTH, corpus=text)
    save_t5_tokenizer(
        t5_dir, vocab_size=T5_VOCAB, model_max_length=MAX_SEQUENCE_LENGTH, corpus=text, whole_words=True
    )
    clip_tok = AutoTokenizer.from_pretrained(str(clip_dir))
    t5_tok = AutoTokenizer.from_pretrained(str(t5_dir))
    for spec in (p for d in scenes.DIMENSIONS for p in scenes.all_prompts(d)):
        words = len(spec.text.split())
        n_clip = len(clip_tok(spec.text)["input_ids"])
        n_t5 = len(t5_tok(spec.text)["input_ids"])
        if n_clip != words + 2 or n_t5 != words + 1 or n_clip > MAX_SEQUENCE_LENGTH:
            raise AssertionError(
                f"toy tokenizers split {spec.text!r} into {n_clip} CLIP / {n_t5} T5 tokens "
                f"(want {words + 2} / {words + 1}, at most {MAX_SEQUENCE_LENGTH})"
            )
    return clip_dir, t5_dir


def t5_config() -> text_encoders.T5Config:
    return text_encoders.T5Config(
        vocab_size=T5_VOCAB, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dense_act_fn="gelu_new", is_gated_act=True,
    )


def clip_config() -> text_encoders.CLIPTextConfig:
    return text_encoders.CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_SEQUENCE_LENGTH,
        hidden_act="quick_gelu", eos_token_id=CLIP_VOCAB - 1, projection_dim=TEXT_DIM,
    )


def init_text_encoders(seed: int) -> tuple[text_encoders.CLIPTextTransformer, text_encoders.T5Encoder]:
    """Random frozen encoders (see the module doc for the CLIP embedding changes)."""
    clip = text_encoders.CLIPTextTransformer(clip_config(), rngs=nnx.Rngs(seed))
    emb = clip.token_embedding.embedding
    table = jax.random.normal(jax.random.key(seed + 1), emb[...].shape, jnp.float32)
    emb[...] = table.at[CLIP_VOCAB - 1].set(0.0)  # EOS (= pad): pooled state is all prompt
    t5 = text_encoders.T5Encoder(t5_config(), rngs=nnx.Rngs(seed + 2))
    return clip, t5


def text_feature_report(encode: Callable[[list[str]], tuple], texts: Sequence[str]) -> dict[str, float]:
    """How distinct the prompts' features are: cosine similarities between prompts.

    ``encode`` is ``FluxPipeline.encode_prompt``. Returns the mean / max cosine
    similarity between the pooled vectors of different prompts, the same for
    the flattened T5 states, and the smallest L2 distance between two prompts'
    T5 states relative to their mean norm.
    """
    txt, _, pooled = encode(list(texts))
    out = {}
    for name, feats in (("pooled", np.asarray(pooled)), ("t5", np.asarray(txt).reshape(len(texts), -1))):
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        cos = unit @ unit.T
        off = cos[~np.eye(len(texts), dtype=bool)]
        out[f"{name}_cos_mean"] = float(off.mean())
        out[f"{name}_cos_max"] = float(off.max())
        d = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
        d = d[~np.eye(len(texts), dtype=bool)]
        out[f"{name}_min_rel_dist"] = float(d.min() / np.linalg.norm(feats, axis=1).mean())
    return out


# ---------------------------------------------------------------------------
# Data.


def sample_batch(
    rng: np.random.Generator, n: int, split: scenes.Split = "train", avoid_heldout: bool = True
) -> tuple[np.ndarray, list[str]]:
    """``n`` random prompts of ``split`` (uniform dimension) and a rendered scene for each.

    Returns images ``[n, 32, 32, 3]`` float32 in [0, 1] and the prompt texts.
    With ``split="train"`` and ``avoid_heldout`` (the transformer's data) no
    image shows a held-out colour-shape pair (see ``scenes.sample_scene``).
    """
    specs = [scenes.sample_prompt(rng, split=split) for _ in range(n)]
    imgs = render_batch([scenes.sample_scene(s, rng, avoid_heldout=avoid_heldout) for s in specs], IMAGE_SIZE)
    return imgs, [s.text for s in specs]


# ---------------------------------------------------------------------------
# VAE.


def vae_config(block_out_channels: tuple[int, ...] = (16, 32, 32)) -> autoencoder.AutoencoderConfig:
    """Toy FLUX VAE: 16 latent channels; scaling/shift placeholders until ``calibrate_vae``."""
    return autoencoder.AutoencoderConfig(
        block_out_channels=block_out_channels, layers_per_block=1, latent_channels=16,
        norm_num_groups=8, scaling_factor=1.0, shift_factor=0.0,
    )


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 1500
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    log_every: int = 100


def vae_loss(model: autoencoder.Autoencoder, images: jax.Array, key: jax.Array, cfg: VAETrainConfig):
    """Reconstruction (L2 + ``l1_weight`` L1, in [-1, 1] space) of a posterior sample
    plus ``kl_weight`` x the KL to N(0, I) per latent element. Returns (loss, metrics)."""
    mean, logvar = model.encode(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    recon = model.decode_raw(z)
    target = 2.0 * images - 1.0
    mse = jnp.mean((recon - target) ** 2)
    l1 = jnp.mean(jnp.abs(recon - target))
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - logvar - 1.0)
    loss = mse + cfg.l1_weight * l1 + cfg.kl_weight * kl
    return loss, {"loss": loss, "mse": mse, "l1": l1, "kl": kl}


def _adamw(lr: float, steps: int, warmup: int, weight_decay: float = 0.0) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.1 * lr)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def make_vae_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: VAETrainConfig):
    """Jitted ``(params, opt_state, images, key) -> (params, opt_state, metrics)``."""

    @jax.jit
    def step(params, opt_state, images, key):
        def loss_fn(p):
            return vae_loss(nnx.merge(graphdef, p), images, key, cfg)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def train_vae(
    cfg: VAETrainConfig, seed: int, *, block_out_channels=(16, 32, 32), log: Log = print,
    history: list | None = None,
) -> autoencoder.Autoencoder:
    """Trains the toy VAE on fresh renders of random scenes (not yet calibrated).

    The VAE is the world's image codec, so its scenes come from *all* prompts and
    show every colour-shape pair (held-out ones included): trained on the
    training split only, it learned "green small blob = square" and decoded the
    held-out green circles as squares (94% reconstruction score on held-out
    scenes after 1,200 steps, all failures of that kind). What the held-out split
    tests, generating an unseen combination from its *prompt*, is the
    transformer's job, and the transformer never sees those prompts or images.
    """
    model = autoencoder.Autoencoder(vae_config(block_out_channels), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    optimizer = _adamw(cfg.lr, cfg.steps, cfg.warmup)
    opt_state = optimizer.init(params)
    step = make_vae_step(graphdef, optimizer, cfg)
    rng = np.random.default_rng([seed, 1])
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        images, _ = sample_batch(rng, cfg.batch, split="all", avoid_heldout=False)
        params, opt_state, metrics = step(params, opt_state, jnp.asarray(images), jax.random.fold_in(key, i))
        if (i + 1) % cfg.log_every == 0 or i == 0 or i + 1 == cfg.steps:
            m = {k: float(v) for k, v in metrics.items()}
            if history is not None:
                history.append({"step": i + 1, **m})
            log(f"vae step {i + 1}/{cfg.steps} loss {m['loss']:.4f} mse {m['mse']:.5f} "
                f"l1 {m['l1']:.4f} kl {m['kl']:.2f} ({time.perf_counter() - t0:.0f}s)")
    return nnx.merge(graphdef, params)


def calibrate_vae(vae: autoencoder.Autoencoder, images: np.ndarray) -> dict[str, float]:
    """Sets ``shift_factor`` / ``scaling_factor`` (config and module) so that the
    posterior means of ``images`` map to zero-mean, unit-variance model-space latents."""
    mean, _ = jax.jit(lambda im: vae.encode(im))(jnp.asarray(images))
    shift = float(jnp.mean(mean))
    scale = float(1.0 / jnp.std(mean))
    vae.cfg = dataclasses.replace(vae.cfg, shift_factor=shift, scaling_factor=scale)
    vae.shift_factor = shift
    vae.scaling_factor = scale
    return {"shift_factor": shift, "scaling_factor": scale}


def reconstruct(vae: autoencoder.Autoencoder, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Posterior-mean reconstructions in [0, 1] (the path a sample takes: latents -> decode)."""
    fn = jax.jit(lambda im: vae.decode(vae.encode_to_latents(im)))
    return np.concatenate([np.asarray(fn(jnp.asarray(images[i : i + batch]))) for i in range(0, len(images), batch)])


# ---------------------------------------------------------------------------
# Transformer.


def flux_config(hidden_size: int = 96, num_heads: int = 2, depth: int = 2, depth_single: int = 2) -> flux.FluxConfig:
    head_dim = hidden_size // num_heads
    a = 2 * ((head_dim // 3) // 2)  # rows and columns get the same (even) number of RoPE dims
    return flux.FluxConfig(
        in_channels=64, out_channels=64, hidden_size=hidden_size, num_heads=num_heads, depth=depth,
        depth_single=depth_single, axes_dim=(head_dim - 2 * a, a, a), context_dim=TEXT_DIM,
        vec_dim=TEXT_DIM, guidance_embed=False,
    )


@dataclasses.dataclass(frozen=True)
class FlowTrainConfig:
    steps: int = 5000
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.0
    t_sampling: str = "logit_normal"  # or "uniform"
    ema_decay: float = 0.999  # > 0: the transformer ends with the EMA of its weights
    log_every: int = 100


def sample_t(key: jax.Array, n: int, kind: str) -> jax.Array:
    """Training noise levels ``[n]`` in (0, 1): SD3 logit-normal ``sigmoid(N(0,1))`` or uniform."""
    if kind == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (n,)))
    if kind == "uniform":
        return jax.random.uniform(key, (n,))
    raise ValueError(f"unknown t_sampling {kind!r}; expected 'logit_normal' or 'uniform'")


def rectified_flow_loss(
    velocity: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, key: jax.Array, t_sampling: str
) -> jax.Array:
    """``mean || velocity(x_t, t) - (noise - x0) ||^2`` with ``x_t = (1 - t) x0 + t noise``.

    ``velocity(x_t [B, L, C], t [B]) -> v``; ``x0`` packed model-space latents.
    """
    k_t, k_n = jax.random.split(key)
    t = sample_t(k_t, x0.shape[0], t_sampling)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    tb = t[:, None, None]
    x_t = (1.0 - tb) * x0 + tb * noise
    v = velocity(x_t, t).astype(jnp.float32)
    return jnp.mean((v - (noise - x0)) ** 2)


def make_flow_step(
    graphdef: nnx.GraphDef, vae: autoencoder.Autoencoder, optimizer: optax.GradientTransformation,
    cfg: FlowTrainConfig,
):
    """Jitted ``(params, ema, opt_state, images, txt, pooled, key) -> (params, ema, opt_state, loss)``.

    Encodes the images with the frozen VAE (posterior mean) inside the step;
    ``ema`` is the exponential moving average of the params (``cfg.ema_decay``;
    passed through unchanged when it is 0).
    """
    vae_graph, vae_params = nnx.split(vae)
    f = vae.cfg.vae_scale_factor
    h = w = IMAGE_SIZE // f

    @jax.jit
    def step(params, ema, opt_state, images, txt, pooled, key, step_index):
        x0 = autoencoder.pack_latents(nnx.merge(vae_graph, vae_params).encode_to_latents(images))
        b = x0.shape[0]
        img_ids = jnp.broadcast_to(autoencoder.latent_image_ids(h, w), (b, x0.shape[1], 3))
        txt_ids = jnp.zeros((b, txt.shape[1], 3), jnp.float32)

        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            return rectified_flow_loss(
                lambda x, t: model(x, img_ids, txt, txt_ids, t, pooled), x0, key, cfg.t_sampling
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if cfg.ema_decay > 0:
            # Warm-up (d = min(decay, (1 + n) / (10 + n))) so the random init fades quickly.
            n = step_index.astype(jnp.float32)
            d = jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n))
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return params, ema, opt_state, loss

    return step


def train_flow(
    pipe: Any, cfg: FlowTrainConfig, seed: int, *, log: Log = print,
    eval_fn: Callable[[int], None] | None = None, eval_every: int = 0,
) -> list[dict[str, float]]:
    """Pretrains ``pipe.transformer`` in place with the rectified-flow loss.

    ``pipe`` is a ``FluxPipeline`` whose VAE is trained and calibrated; prompt
    features of the whole training pool are computed once with
    ``pipe.encode_prompt``. ``eval_fn(step)`` runs every ``eval_every`` steps
    (on the EMA weights when ``cfg.ema_decay > 0``). Returns the loss curve:
    ``{"step", "loss"}`` (mean over the last ``log_every`` steps) per log line.
    """
    texts = corpus()
    index = {t: i for i, t in enumerate(texts)}
    txt_all, _, pooled_all = pipe.encode_prompt(texts)
    txt_all, pooled_all = np.asarray(txt_all), np.asarray(pooled_all)
    graphdef, params = nnx.split(pipe.transformer)
    optimizer = _adamw(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay)
    opt_state = optimizer.init(params)
    step = make_flow_step(graphdef, pipe.vae, optimizer, cfg)
    ema = jax.tree.map(jnp.copy, params) if cfg.ema_decay > 0 else None
    rng = np.random.default_rng([seed, 2])
    key = jax.random.key(seed + 3)
    t0 = time.perf_counter()
    running = []
    curve = []
    for i in range(cfg.steps):
        images, prompts = sample_batch(rng, cfg.batch)
        idx = np.asarray([index[p] for p in prompts])
        params, ema, opt_state, loss = step(
            params, ema, opt_state, jnp.asarray(images), jnp.asarray(txt_all[idx]), jnp.asarray(pooled_all[idx]),
            jax.random.fold_in(key, i), jnp.asarray(i, jnp.int32),
        )
        running.append(loss)
        if (i + 1) % cfg.log_every == 0 or i == 0 or i + 1 == cfg.steps:
            mean_loss = float(jnp.mean(jnp.stack(running)))
            running = []
            curve.append({"step": i + 1, "loss": mean_loss})
            log(f"flow step {i + 1}/{cfg.steps} loss {mean_loss:.4f} ({time.perf_counter() - t0:.0f}s)")
        if eval_fn is not None and eval_every and (i + 1) % eval_every == 0 and i + 1 < cfg.steps:
            nnx.update(pipe.transformer, ema if ema is not None else params)
            eval_fn(i + 1)
    nnx.update(pipe.transformer, ema if ema is not None else params)
    return curve


# ---------------------------------------------------------------------------
# Evaluation.


def sample_images(
    pipe: Any, prompts: Sequence[str], key: jax.Array, *, num_steps: int = 20,
    schedule: str = "sd3", shift: float = 1.0, mode: str = "ode", eta: float = 0.7, batch: int = 128,
) -> np.ndarray:
    """Images ``[N, 32, 32, 3]`` in [0, 1] from the pipeline's transformer and VAE.

    ``mode="ode"``: deterministic Euler (as ``FluxPipeline.generate_latents``,
    but with an explicit schedule); ``"flow"``/``"dance"``: the SDE samplers GRPO
    trains with. Each prompt gets its own initial noise.
    """
    h, w = pipe.latent_hw(IMAGE_SIZE, IMAGE_SIZE)
    latent_shape = ((h // 2) * (w // 2), pipe.transformer.cfg.in_channels)
    config = sampling.SamplerConfig(
        num_steps=num_steps, eta=eta, mode=mode, schedule=schedule, shift=shift,
        image_seq_len=latent_shape[0], group_size=1, init_same_noise=False,
    )
    _, params = nnx.split(pipe.transformer)
    vae_graph, vae_params = nnx.split(pipe.vae)
    decode = jax.jit(lambda vp, x: nnx.merge(vae_graph, vp).decode(autoencoder.unpack_latents(x, h, w)))
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        txt, txt_ids, pooled = pipe.encode_prompt(chunk)
        cond = pipe.conditioning(txt, txt_ids, pooled, IMAGE_SIZE, IMAGE_SIZE, None)
        traj = sampling.sample_trajectory(
            pipe.velocity_fn, config, params, jax.random.fold_in(key, i), cond, latent_shape
        )
        out.append(np.asarray(decode(vae_params, traj.latents[:, -1])))
    return np.concatenate(out)


def score_images(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Verifier table: per-dimension mean score and ``overall`` (unweighted over dimensions)."""
    return score_table([verify(im, p) for im, p in zip(images, prompts)], list(prompts))


def heldout_texts(n_per_dim: int) -> list[str]:
    return [p.text for p in scenes.heldout_prompts(n_per_dim)]
