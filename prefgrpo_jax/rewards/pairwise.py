"""Pairwise preference reward model (PPRM) and its pointwise baseline, Flax NNX.

Pref-GRPO rewards an image by its win rate against the other images of its
group. Asking an external judge for all G(G-1)/2 pairs is slow; this module is
the in-graph alternative: a *backbone* embeds the prompt and every image
**once**, and a light *pairwise head* compares image features for all ordered
pairs of a group in one vectorised call.

Shapes (N groups/prompts, G images per group, D feature width)::

    prompt_feats = model.encode_prompts(token_ids [N,T], mask [N,T])   # [N, D]
    image_feats  = model.encode_images(images [N*G,H,W,3] in [0,1])    # [N*G, D]
    P = model.preference_matrix(prompt_feats, image_feats.reshape(N, G, D))  # [N,G,G]

``P[n, i, j]`` is the probability that image i beats image j for prompt n.

Antisymmetry by construction
----------------------------
The head scores an *ordered* pair with an MLP ``m`` over interaction features
``x(p, a, b) = [q*u_a, q*u_b, u_a - u_b, u_a*u_b, q]`` (``q``, ``u`` are the
projected prompt and image features) and returns::

    logit(a, b) = (m(x(p, a, b)) - m(x(p, b, a))) / 2

so ``logit(b, a) = -logit(a, b)`` exactly (IEEE subtraction is exactly
antisymmetric), and it is not a pointwise difference ``g(a) - g(b)``: the
``u_a*u_b`` and ``q*u`` interactions let the preference depend on *what the two
images have in common* and on the prompt. The vectorised group scorer
evaluates ``m`` once per ordered pair into ``M [N,G,G]`` and forms
``L = (M - M^T)/2``. Probabilities use :func:`probs_from_logits`, which
evaluates the sigmoid only on the non-negative side, so ``P + P^T == 1``
holds *bitwise* and the diagonal is exactly 0.5.

The pointwise baseline (:class:`PointwiseRewardModel`) puts a scalar score head
``s(p, a)`` on the same backbone and is trained on the same pairs with
Bradley-Terry, ``P(a > b) = sigmoid(s_a - s_b)``; it feeds the score-based GRPO
baseline (group-normalised scores, the "illusory advantage" setting).

Backbones
---------
Anything with ``encode_images(images [B,H,W,3] in [0,1]) -> [B,D]``,
``encode_prompts(token_ids [B,T], mask [B,T]) -> [B,D]`` and ``feature_dim``:

* :class:`ToyBackbone`: a small strided-conv image encoder and a
  bag-of-embeddings (unigrams + hashed bigrams) text encoder, for the toy world
  (32x32 / 64x64 images, a :class:`WordTokenizer` vocabulary).
* :class:`CLIPBackbone`: the Flax CLIP towers of ``models/clip.py`` (resize and
  normalisation in-graph, L2-normalised projected features); frozen or
  trainable is a training option (``train_reward.TrainConfig.train_backbone``).

Pure-functional use, jit and sharding
-------------------------------------
:func:`split_reward_model` returns ``(fns, params)``: ``fns`` (a
:class:`RewardFns`, hashable, holding the graphdef) exposes every method as a
pure function of ``params`` and arrays, e.g.
``fns.preference_matrix(params, prompt_feats, image_feats)``, safe under
``jax.jit`` and inside a sharded step. :func:`make_sharded_group_scorer` builds a
``shard_map``-ped group scorer: groups are split over one mesh axis and,
optionally, the images of a group over another; every device encodes only its
own images, and when a group's images are spread over devices only their
**features** (``D`` floats per image) are all-gathered, never the images.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax import convert
from prefgrpo_jax.convert import WeightMismatchError

__all__ = [
    "CLIPBackbone",
    "HFTokenizer",
    "PairwiseHead",
    "PairwiseRewardModel",
    "PointwiseHead",
    "PointwiseRewardModel",
    "RewardFns",
    "RewardModelConfig",
    "ToyBackbone",
    "ToyBackboneConfig",
    "WeightMismatchError",
    "WordTokenizer",
    "build_reward_model",
    "gather_group_features",
    "load_reward_model",
    "make_sharded_group_scorer",
    "probs_from_logits",
    "save_reward_model",
    "split_reward_model",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "reward_config.json"
_FORMAT_VERSION = 1


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, rngs=rngs)


# --------------------------------------------------------------------------- #
# Exactly antisymmetric probabilities
# --------------------------------------------------------------------------- #


def probs_from_logits(logits: jax.Array) -> jax.Array:
    """``sigmoid(logits)`` such that antisymmetric logits give ``P + P^T == 1`` bitwise.

    For ``L >= 0`` returns ``s = sigmoid(L)`` (``s >= 0.5``); for ``L < 0``
    returns ``1 - sigmoid(-L)``. Since ``1 - s`` is exact for ``s in [0.5, 1]``
    (Sterbenz), ``P(a, b) + P(b, a)`` is exactly 1 whenever
    ``L(b, a) == -L(a, b)``; ``L == 0`` gives exactly 0.5. Always fp32.
    """
    logits = logits.astype(jnp.float32)
    s = jax.nn.sigmoid(jnp.abs(logits))
    return jnp.where(logits >= 0, s, 1.0 - s)


# --------------------------------------------------------------------------- #
# Tokenizers (Python side, outside jit)
# --------------------------------------------------------------------------- #

_WORD_RE = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    """Word-level tokenizer for the toy world's tiny vocabulary.

    Lower-cases, splits on non-alphanumerics; id 0 is padding, 1 unknown, the
    vocabulary words follow in the given order. ``__call__(texts)`` returns
    ``(ids [B, max_len] int32, mask [B, max_len] int32)``, truncating longer texts.
    """

    PAD, UNK = 0, 1

    def __init__(self, vocab: Sequence[str], max_len: int = 16):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        vocab = list(vocab)
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary words must be unique")
        bad = [w for w in vocab if not _WORD_RE.fullmatch(w)]
        if bad:
            raise ValueError(f"vocabulary words must be lower-case alphanumeric, got {bad[:5]}")
        self.vocab = vocab
        self.max_len = int(max_len)
        self._ids = {w: i + 2 for i, w in enumerate(vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_len: int = 16) -> WordTokenizer:
        """Vocabulary = sorted set of words in ``texts``."""
        words = sorted({w for t in texts for w in _WORD_RE.findall(t.lower())})
        return cls(words, max_len=max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def tokenize(self, text: str) -> list[int]:
        return [self._ids.get(w, self.UNK) for w in _WORD_RE.findall(text.lower())]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        ids = np.zeros((len(texts), self.max_len), np.int32)
        mask = np.zeros((len(texts), self.max_len), np.int32)
        for i, t in enumerate(texts):
            tok = self.tokenize(t)[: self.max_len]
            ids[i, : len(tok)] = tok
            mask[i, : len(tok)] = 1
        return ids, mask

    def to_json(self) -> dict[str, Any]:
        return {"type": "word", "vocab": self.vocab, "max_len": self.max_len}


class HFTokenizer:
    """Wraps a transformers tokenizer: ``texts -> (ids, mask)`` padded to ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int = 77):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 77) -> HFTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), max_length=max_length)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def to_json(self) -> dict[str, Any]:
        return {"type": "hf", "max_length": self.max_length}


def tokenizer_from_json(spec: Mapping[str, Any], directory: str | Path | None = None):
    if spec.get("type") == "word":
        return WordTokenizer(spec["vocab"], max_len=spec["max_len"])
    if spec.get("type") == "hf":
        if directory is None:
            raise ValueError("an HF tokenizer is loaded from the model directory")
        return HFTokenizer.from_pretrained(directory, max_length=spec["max_length"])
    raise ValueError(f"unknown tokenizer spec {dict(spec)!r}")


# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ToyBackboneConfig:
    """Toy backbone: strided 3x3 convs + global mean pool; bag of embeddings.

    vocab_size: token ids in ``[0, vocab_size)`` (0 = padding, masked out).
    channels: output channels of the stride-2 conv layers.
    embed_dim: token embedding width.
    bigram_buckets: hashed bigram embeddings (0 disables); they let a bag of
      embeddings tell "red circle and blue square" from "blue circle and red
      square".
    feature_dim: width D of image and prompt features.
    """

    vocab_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)
    embed_dim: int = 64
    bigram_buckets: int = 256
    feature_dim: int = 64


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """Everything needed to rebuild a reward model (saved as JSON next to its weights).

    kind: ``"pairwise"`` (PPRM) or ``"pointwise"`` (score head, Bradley-Terry).
    backbone: ``"toy"`` or ``"clip"``.
    hidden: head width H; depth: hidden layers of the head MLP.
    toy: the toy backbone's config (``backbone="toy"``).
    clip: the CLIP model config (``backbone="clip"``), a ``models.clip.CLIPConfig``.
    """

    kind: str = "pairwise"
    backbone: str = "toy"
    hidden: int = 64
    depth: int = 2
    toy: ToyBackboneConfig = dataclasses.field(default_factory=ToyBackboneConfig)
    clip: Any = None

    def __post_init__(self):
        if self.kind not in ("pairwise", "pointwise"):
            raise ValueError(f"kind must be 'pairwise' or 'pointwise', got {self.kind!r}")
        if self.backbone not in ("toy", "clip"):
            raise ValueError(f"backbone must be 'toy' or 'clip', got {self.backbone!r}")
        if self.hidden < 1 or self.depth < 1:
            raise ValueError(f"hidden and depth must be >= 1, got {self.hidden}, {self.depth}")

    def to_json(self) -> dict[str, Any]:
        d = {"kind": self.kind, "backbone": self.backbone, "hidden": self.hidden,
             "depth": self.depth, "toy": dataclasses.asdict(self.toy), "clip": None}
        if self.clip is not None:
            d["clip"] = dataclasses.asdict(self.clip)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RewardModelConfig:
        toy = dict(d.get("toy") or {})
        if "channels" in toy:
            toy["channels"] = tuple(toy["channels"])
        clip = None
        if d.get("clip") is not None:
            from prefgrpo_jax.models.clip import CLIPConfig, CLIPVisionConfig
            from prefgrpo_jax.models.text_encoders import CLIPTextConfig

            c = d["clip"]
            clip = CLIPConfig(text=CLIPTextConfig(**c["text"]),
                              vision=CLIPVisionConfig(**c["vision"]),
                              projection_dim=c["projection_dim"])
        return cls(kind=d["kind"], backbone=d["backbone"], hidden=d["hidden"],
                   depth=d["depth"], toy=ToyBackboneConfig(**toy), clip=clip)


# --------------------------------------------------------------------------- #
# Backbones
# --------------------------------------------------------------------------- #


class ToyBackbone(nnx.Module):
    """Small conv image encoder + bag-of-embeddings prompt encoder (toy world)."""

    def __init__(self, cfg: ToyBackboneConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.feature_dim = cfg.feature_dim
        chans = (3,) + tuple(cfg.channels)
        self.convs = nnx.List([
            nnx.Conv(chans[i], chans[i + 1], kernel_size=(3, 3), strides=(2, 2),
                     padding="SAME", rngs=rngs)
            for i in range(len(cfg.channels))
        ])
        self.img_out = _linear(2 * chans[-1], cfg.feature_dim, rngs)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs)
        self.bigram = (nnx.Embed(cfg.bigram_buckets, cfg.embed_dim, rngs=rngs)
                       if cfg.bigram_buckets > 0 else None)
        self.txt_hidden = _linear(cfg.embed_dim, cfg.embed_dim, rngs)
        self.txt_out = _linear(cfg.embed_dim, cfg.feature_dim, rngs)

    def encode_images(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [0, 1] -> ``[B, D]`` (mean- and max-pooled conv features)."""
        x = images.astype(jnp.float32) * 2.0 - 1.0
        for conv in self.convs:
            x = jax.nn.gelu(conv(x))
        pooled = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], -1)
        return self.img_out(pooled)

    def encode_prompts(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """``[B, T]`` ids and 0/1 mask -> ``[B, D]``: masked mean of (bigram) embeddings."""
        mask = mask.astype(jnp.float32)
        e = self.embed(token_ids) * mask[..., None]
        total = jnp.sum(e, axis=1)
        count = jnp.sum(mask, axis=1, keepdims=True)
        if self.bigram is not None and token_ids.shape[1] > 1:
            ids = token_ids.astype(jnp.uint32)
            h = (ids[:, :-1] * jnp.uint32(self.cfg.vocab_size) + ids[:, 1:]) * jnp.uint32(
                2654435761)
            bucket = (h % jnp.uint32(self.cfg.bigram_buckets)).astype(jnp.int32)
            bmask = mask[:, :-1] * mask[:, 1:]
            total = total + jnp.sum(self.bigram(bucket) * bmask[..., None], axis=1)
            count = count + jnp.sum(bmask, axis=1, keepdims=True)
        x = total / jnp.maximum(count, 1.0)
        return self.txt_out(jax.nn.gelu(self.txt_hidden(x)))


class CLIPBackbone(nnx.Module):
    """The Flax CLIP towers as a backbone: L2-normalised projected features.

    ``encode_images`` resizes / crops / normalises in-graph with
    ``models.clip.preprocess_images`` to the vision tower's ``image_size``.
    """

    def __init__(self, clip: Any):
        self.clip = clip
        self.feature_dim = clip.cfg.projection_dim
        self.image_size = clip.cfg.vision.image_size

    def encode_images(self, images: jax.Array) -> jax.Array:
        from prefgrpo_jax.models.clip import preprocess_images

        px = preprocess_images(images, size=self.image_size)
        f = self.clip.get_image_features(px).astype(jnp.float32)
        return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    def encode_prompts(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        f = self.clip.get_text_features(token_ids, mask).astype(jnp.float32)
        return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- #
# Heads
# --------------------------------------------------------------------------- #


class _Embedder(nnx.Module):
    """LayerNorm + linear projection of image and prompt features to width H."""

    def __init__(self, feature_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.img_norm = nnx.LayerNorm(feature_dim, rngs=rngs)
        self.img_proj = _linear(feature_dim, hidden, rngs)
        self.txt_norm = nnx.LayerNorm(feature_dim, rngs=rngs)
        self.txt_proj = _linear(feature_dim, hidden, rngs)

    def image(self, f: jax.Array) -> jax.Array:
        return self.img_proj(self.img_norm(f.astype(jnp.float32)))

    def prompt(self, p: jax.Array) -> jax.Array:
        return self.txt_proj(self.txt_norm(p.astype(jnp.float32)))


class _MLP(nnx.Module):
    def __init__(self, d_in: int, hidden: int, depth: int, *, rngs: nnx.Rngs):
        dims = [d_in] + [hidden] * depth
        self.layers = nnx.List([_linear(dims[i], dims[i + 1], rngs) for i in range(depth)])
        self.out = _linear(hidden, 1, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.out(x)[..., 0]


class PairwiseHead(nnx.Module):
    """Antisymmetric pairwise head: ``logit(a, b) = (m(x_ab) - m(x_ba)) / 2``."""

    def __init__(self, feature_dim: int, hidden: int = 64, depth: int = 2, *, rngs: nnx.Rngs):
        self.embed = _Embedder(feature_dim, hidden, rngs=rngs)
        self.mlp = _MLP(5 * hidden, hidden, depth, rngs=rngs)

    def _m(self, q: jax.Array, ua: jax.Array, ub: jax.Array) -> jax.Array:
        shape = jnp.broadcast_shapes(q.shape, ua.shape, ub.shape)
        q, ua, ub = (jnp.broadcast_to(t, shape) for t in (q, ua, ub))
        return self.mlp(jnp.concatenate([q * ua, q * ub, ua - ub, ua * ub, q], axis=-1))

    def pair_logits(self, p: jax.Array, fa: jax.Array, fb: jax.Array) -> jax.Array:
        """Features ``[..., D]`` of prompt, image a, image b -> logit of ``a > b``, ``[...]``."""
        q, ua, ub = self.embed.prompt(p), self.embed.image(fa), self.embed.image(fb)
        return 0.5 * (self._m(q, ua, ub) - self._m(q, ub, ua))

    def logit_matrix(self, p: jax.Array, f: jax.Array) -> jax.Array:
        """``p [N, D]``, ``f [N, G, D]`` -> ``L [N, G, G]``, ``L = -L^T`` exactly.

        Projections run once per image; the MLP once per ordered pair.
        """
        q = self.embed.prompt(p)[:, None, None, :]
        u = self.embed.image(f)
        m = self._m(q, u[:, :, None, :], u[:, None, :, :])  # m[n, i, j] = m(x(p, i, j))
        return 0.5 * (m - jnp.swapaxes(m, 1, 2))


class PointwiseHead(nnx.Module):
    """Scalar score ``s(p, a)`` on the same features (Bradley-Terry baseline)."""

    def __init__(self, feature_dim: int, hidden: int = 64, depth: int = 2, *, rngs: nnx.Rngs):
        self.embed = _Embedder(feature_dim, hidden, rngs=rngs)
        self.mlp = _MLP(3 * hidden, hidden, depth, rngs=rngs)

    def score(self, p: jax.Array, f: jax.Array) -> jax.Array:
        """``p [..., D]`` broadcastable against ``f [..., D]`` -> ``[...]``."""
        q, u = self.embed.prompt(p), self.embed.image(f)
        shape = jnp.broadcast_shapes(q.shape, u.shape)
        q, u = jnp.broadcast_to(q, shape), jnp.broadcast_to(u, shape)
        return self.mlp(jnp.concatenate([q * u, u, q], axis=-1))


# --------------------------------------------------------------------------- #
# Reward models
# --------------------------------------------------------------------------- #


class _RewardModel(nnx.Module):
    kind: str = ""

    def __init__(self, backbone: nnx.Module, head: nnx.Module,
                 config: RewardModelConfig | None = None):
        self.backbone = backbone
        self.head = head
        self.config = config

    def encode_images(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [0, 1] -> ``[B, D]``."""
        return self.backbone.encode_images(images)

    def encode_prompts(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """``[B, T]`` -> ``[B, D]``."""
        return self.backbone.encode_prompts(token_ids, mask)

    def encode_groups(self, token_ids, mask, images) -> tuple[jax.Array, jax.Array]:
        """``images [N, G, H, W, 3]`` -> ``(prompt_feats [N, D], image_feats [N, G, D])``.

        The image encoder runs once, on the ``N * G`` images as one batch.
        """
        n, g = images.shape[:2]
        f = self.backbone.encode_images(images.reshape((n * g,) + images.shape[2:]))
        return self.backbone.encode_prompts(token_ids, mask), f.reshape(n, g, -1)

    def pair_logits_from_inputs(self, token_ids, mask, image_a, image_b) -> jax.Array:
        """Logits of ``a > b`` for a batch of pairs ``[B]`` (both images in one encoder call)."""
        b = image_a.shape[0]
        f = self.backbone.encode_images(jnp.concatenate([image_a, image_b], axis=0))
        p = self.backbone.encode_prompts(token_ids, mask)
        return self.pair_logits(p, f[:b], f[b:])

    def group_reward(self, token_ids, mask, images) -> jax.Array:
        """Pairwise: ``P [N, G, G]``; pointwise: scores ``[N, G]``."""
        p, f = self.encode_groups(token_ids, mask, images)
        return self.reward_from_features(p, f)


class PairwiseRewardModel(_RewardModel):
    """Backbone + :class:`PairwiseHead`: ``P(a > b | p)``."""

    kind = "pairwise"

    def pair_logits(self, p: jax.Array, fa: jax.Array, fb: jax.Array) -> jax.Array:
        return self.head.pair_logits(p, fa, fb)

    def logit_matrix(self, p: jax.Array, f: jax.Array) -> jax.Array:
        return self.head.logit_matrix(p, f)

    def preference_matrix(self, p: jax.Array, f: jax.Array) -> jax.Array:
        """``p [N, D]``, ``f [N, G, D]`` -> ``P [N, G, G]`` fp32, ``P + P^T = 1``, diag 0.5."""
        return probs_from_logits(self.head.logit_matrix(p, f))

    reward_from_features = preference_matrix


class PointwiseRewardModel(_RewardModel):
    """Backbone + :class:`PointwiseHead`: scores; pairs via Bradley-Terry."""

    kind = "pointwise"

    def score(self, p: jax.Array, f: jax.Array) -> jax.Array:
        return self.head.score(p, f)

    def scores(self, p: jax.Array, f: jax.Array) -> jax.Array:
        """``p [N, D]``, ``f [N, G, D]`` -> ``[N, G]`` fp32."""
        return self.head.score(p[:, None, :], f).astype(jnp.float32)

    def pair_logits(self, p: jax.Array, fa: jax.Array, fb: jax.Array) -> jax.Array:
        """Bradley-Terry logit ``s(p, a) - s(p, b)``."""
        return self.head.score(p, fa) - self.head.score(p, fb)

    def logit_matrix(self, p: jax.Array, f: jax.Array) -> jax.Array:
        s = self.scores(p, f)
        return s[:, :, None] - s[:, None, :]

    def preference_matrix(self, p: jax.Array, f: jax.Array) -> jax.Array:
        return probs_from_logits(self.logit_matrix(p, f))

    reward_from_features = scores


def build_reward_model(
    cfg: RewardModelConfig, *, rngs: nnx.Rngs | None = None, clip: Any = None
) -> PairwiseRewardModel | PointwiseRewardModel:
    """Builds a reward model from its config.

    Args:
      cfg: the config; for ``backbone="clip"`` either ``cfg.clip`` or ``clip``.
      rngs: initialisation RNGs (default ``nnx.Rngs(0)``).
      clip: an existing ``models.clip.CLIPModel`` (e.g. from ``load_clip``) to use
        as the backbone; its config replaces ``cfg.clip``.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if cfg.backbone == "toy":
        backbone = ToyBackbone(cfg.toy, rngs=rngs)
    else:
        if clip is None:
            if cfg.clip is None:
                raise ValueError("backbone='clip' needs cfg.clip (a CLIPConfig) or clip=CLIPModel")
            from prefgrpo_jax.models.clip import CLIPModel

            clip = CLIPModel(cfg.clip, rngs=rngs)
        cfg = dataclasses.replace(cfg, clip=clip.cfg)
        backbone = CLIPBackbone(clip)
    cls, head_cls = ((PairwiseRewardModel, PairwiseHead) if cfg.kind == "pairwise"
                     else (PointwiseRewardModel, PointwiseHead))
    head = head_cls(backbone.feature_dim, cfg.hidden, cfg.depth, rngs=rngs)
    return cls(backbone, head, cfg)


# --------------------------------------------------------------------------- #
# Pure-functional view
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RewardFns:
    """The model's methods as pure functions of ``params`` (jit / shard_map safe).

    ``params`` is the ``nnx.Param`` state from :func:`split_reward_model`. The
    object is hashable (a graphdef and a string), so it may be a static
    argument; its bound methods can be passed to ``jax.jit`` directly.
    """

    graphdef: Any
    kind: str

    def merge(self, params) -> PairwiseRewardModel | PointwiseRewardModel:
        return nnx.merge(self.graphdef, params)

    def encode_images(self, params, images: jax.Array) -> jax.Array:
        return self.merge(params).encode_images(images)

    def encode_prompts(self, params, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.merge(params).encode_prompts(token_ids, mask)

    def pair_logits(self, params, prompt_feats, feats_a, feats_b) -> jax.Array:
        """Features ``[B, D]`` x3 -> ``[B]`` logits of ``a > b``."""
        return self.merge(params).pair_logits(prompt_feats, feats_a, feats_b)

    def logit_matrix(self, params, prompt_feats, image_feats) -> jax.Array:
        return self.merge(params).logit_matrix(prompt_feats, image_feats)

    def preference_matrix(self, params, prompt_feats, image_feats) -> jax.Array:
        """``prompt_feats [N, D]``, ``image_feats [N, G, D]`` -> ``P [N, G, G]``."""
        return self.merge(params).preference_matrix(prompt_feats, image_feats)

    def scores(self, params, prompt_feats, image_feats) -> jax.Array:
        """Pointwise models only: ``[N, G]``."""
        if self.kind != "pointwise":
            raise TypeError("scores() needs a pointwise reward model; use preference_matrix()")
        return self.merge(params).scores(prompt_feats, image_feats)

    def reward_from_features(self, params, prompt_feats, image_feats) -> jax.Array:
        """``P [N, G, G]`` (pairwise) or scores ``[N, G]`` (pointwise)."""
        return self.merge(params).reward_from_features(prompt_feats, image_feats)

    def group_reward(self, params, token_ids, mask, images) -> jax.Array:
        """From tokens ``[N, T]`` and images ``[N, G, H, W, 3]``: P or scores.

        Each image passes the backbone once (one batch of ``N * G``).
        """
        return self.merge(params).group_reward(token_ids, mask, images)


def split_reward_model(model: nnx.Module) -> tuple[RewardFns, Any]:
    """``(RewardFns, params)`` of a reward model (all its variables must be ``nnx.Param``)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return RewardFns(graphdef, model.kind), params


def gather_group_features(image_feats: jax.Array, axis_name: str) -> jax.Array:
    """Inside ``shard_map``: all-gather a group's image features split along G.

    ``[N, G_local, D] -> [N, G, D]``. Only features (``D`` floats per image)
    move between devices, never images.
    """
    return jax.lax.all_gather(image_feats, axis_name, axis=1, tiled=True, to="invarying")


def _lay_out(x: jax.Array, mesh: jax.sharding.Mesh, spec) -> jax.Array:
    """Constrains ``x`` to ``spec`` on ``mesh`` (``reshard`` for Explicit axes)."""
    from jax.sharding import AxisType, NamedSharding

    names = [a for entry in spec if entry is not None
             for a in ((entry,) if isinstance(entry, str) else entry)]
    if not names:
        return x
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if all(types[a] == AxisType.Explicit for a in names):
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_sharded_group_scorer(
    fns: RewardFns, mesh: jax.sharding.Mesh, *, group_axis: str | None = "data",
    image_axis: str | None = None,
) -> Callable[..., jax.Array]:
    """A jitted, ``shard_map``-ped ``(params, token_ids, mask, images) -> reward``.

    Args:
      fns: from :func:`split_reward_model`; params are replicated.
      mesh: the device mesh.
      group_axis: mesh axis the N groups (prompts) are split over, or None.
      image_axis: mesh axis the G images of every group are split over, or None.
        Each device encodes only its images; the group's features are then
        all-gathered over this axis (:func:`gather_group_features`), and the
        G x G comparisons of the local groups run on every device of the axis.

    Returns ``P [N, G, G]`` (pairwise) or scores ``[N, G]`` (pointwise), sharded
    over ``group_axis`` along N.
    """
    from jax.sharding import PartitionSpec as PS

    def local(params, token_ids, mask, images):
        model = fns.merge(params)
        p, f = model.encode_groups(token_ids, mask, images)
        if image_axis is not None:
            f = gather_group_features(f, image_axis)
        return model.reward_from_features(p, f)

    in_specs = (PS(), PS(group_axis), PS(group_axis), PS(group_axis, image_axis))
    scorer = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=PS(group_axis))

    @jax.jit
    def run(params, token_ids, mask, images):
        # Lay the inputs out as the specs say (a no-op when they already are);
        # works for meshes with Auto and Explicit axes alike.
        args = tuple(_lay_out(x, mesh, s) for x, s in zip((token_ids, mask, images),
                                                         in_specs[1:]))
        return scorer(params, *args)

    return run


# --------------------------------------------------------------------------- #
# Save / load (safetensors + JSON config, keys and shapes checked)
# --------------------------------------------------------------------------- #


def save_reward_model(model: nnx.Module, directory: str | Path, *, tokenizer: Any = None,
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Writes ``model.safetensors`` (flat dotted parameter names) and ``reward_config.json``.

    Args:
      model: built by :func:`build_reward_model` (its ``config`` is saved).
      directory: created if needed.
      tokenizer: a :class:`WordTokenizer` (vocabulary saved in the JSON) or an
        :class:`HFTokenizer` (its files saved with ``save_pretrained``).
      extra: JSON-able metadata stored under ``"extra"`` (e.g. held-out accuracy).
    """
    from safetensors.numpy import save_file

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, RewardModelConfig):
        raise ValueError("only models built by build_reward_model (with a config) can be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.array(v, order="C") for k, v in convert.flat_params(model).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    meta: dict[str, Any] = {"format_version": _FORMAT_VERSION, "config": cfg.to_json(),
                            "tokenizer": None, "extra": dict(extra or {})}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_json()
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.tokenizer.save_pretrained(str(directory))
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def read_reward_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}; save with save_reward_model")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def load_reward_model(directory: str | Path, *, dtype=None):
    """Loads ``(model, tokenizer or None)`` saved by :func:`save_reward_model`.

    Every tensor name and shape is checked against the config's model.

    Raises:
      WeightMismatchError: listing missing, unexpected and mis-shaped tensors.
    """
    directory = Path(directory)
    meta = read_reward_config(directory)
    cfg = RewardModelConfig.from_json(meta["config"])
    tensors = convert.read_safetensors(directory / WEIGHTS_FILE)

    def identity(src: convert.SourceTensors) -> convert.TensorMap:
        return {k: (k, src.take(k)) for k in src.keys()}

    model = convert.load_model(lambda: build_reward_model(cfg, rngs=nnx.Rngs(0)), identity,
                               tensors, origin=str(directory / WEIGHTS_FILE), dtype=dtype)
    tok = meta.get("tokenizer")
    return model, (tokenizer_from_json(tok, directory) if tok else None)
