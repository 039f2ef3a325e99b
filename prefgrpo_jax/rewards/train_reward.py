"""Training the pairwise (or pointwise) reward model on preference pairs.

A pair is ``(prompt, image_a, image_b, label)`` with ``label = P(a preferred)``:
1 (a wins), 0 (b wins), 0.5 (tie) or any soft value in [0, 1]. The loss is the
binary cross-entropy of the model's logit of ``a > b`` against the label; for
the pointwise model that logit is ``s_a - s_b`` (Bradley-Terry). Ties enter the
loss (they pull the logit to 0) but not the accuracy.

Library use (no files needed)::

    model = build_reward_model(RewardModelConfig(kind="pairwise", backbone="toy", ...))
    train, held_out = split_pairs(PairArrays(ids, mask, img_a, img_b, label), 0.1)
    result = train_reward_model(model, train, held_out, TrainConfig(steps=500))
    save_reward_model(result.model, "out/", tokenizer=tok,
                      extra={"heldout_accuracy": result.eval_metrics["accuracy"]})

With a frozen backbone (``train_backbone=False``; the default for CLIP) every
image is encoded once up front and only the head is trained, on cached
features. With a trainable backbone both images of a pair go through the
encoder in one batch per step.

Command line (the data through ``prefgrpo_jax.data``'s TFDS preference-pair
builder)::

    python -m prefgrpo_jax.rewards.train_reward --data=pairs.jsonl --images=imgs/ \\
        --out=/tmp/pprm --steps=2000 --model=pairwise --backbone=toy
    python -m prefgrpo_jax.rewards.train_reward ... --backbone=clip --clip_path=/ckpt/clip
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefgrpo_jax.rewards.pairwise import (
    HFTokenizer,
    RewardModelConfig,
    ToyBackboneConfig,
    WordTokenizer,
    build_reward_model,
    save_reward_model,
    split_reward_model,
)

__all__ = [
    "PairArrays",
    "TrainConfig",
    "TrainResult",
    "evaluate_pairs",
    "load_pair_arrays",
    "make_optimizer",
    "split_pairs",
    "train_reward_model",
]


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class PairArrays:
    """Preference pairs in memory.

    token_ids, mask: ``[M, T]`` int (the prompt of each pair, tokenized).
    image_a, image_b: ``[M, H, W, 3]``, uint8 (0..255) or float in [0, 1].
    label: ``[M]`` float, P(image_a preferred).
    """

    token_ids: np.ndarray
    mask: np.ndarray
    image_a: np.ndarray
    image_b: np.ndarray
    label: np.ndarray

    def __post_init__(self):
        self.token_ids = np.asarray(self.token_ids, np.int32)
        self.mask = np.asarray(self.mask, np.int32)
        self.label = np.asarray(self.label, np.float32)
        self.image_a, self.image_b = np.asarray(self.image_a), np.asarray(self.image_b)
        m = len(self.label)
        if self.label.ndim != 1 or m == 0:
            raise ValueError(f"label must be a non-empty [M] array, got {self.label.shape}")
        if self.token_ids.shape != self.mask.shape or self.token_ids.ndim != 2 \
                or self.token_ids.shape[0] != m:
            raise ValueError(f"token_ids {self.token_ids.shape} and mask {self.mask.shape} "
                             f"must both be [M={m}, T]")
        for name, x in (("image_a", self.image_a), ("image_b", self.image_b)):
            if x.ndim != 4 or x.shape[0] != m or x.shape[-1] != 3:
                raise ValueError(f"{name} must be [M={m}, H, W, 3], got {x.shape}")
        if self.image_a.shape != self.image_b.shape:
            raise ValueError(f"image_a {self.image_a.shape} and image_b {self.image_b.shape} "
                             "differ in shape")
        if not (np.all(np.isfinite(self.label)) and np.all((self.label >= 0)
                                                            & (self.label <= 1))):
            raise ValueError("labels must lie in [0, 1] (1: image_a preferred, 0: image_b)")

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx) -> PairArrays:
        idx = np.asarray(idx)
        return PairArrays(self.token_ids[idx], self.mask[idx], self.image_a[idx],
                          self.image_b[idx], self.label[idx])


def split_pairs(pairs: PairArrays, eval_fraction: float = 0.1, seed: int = 0
                ) -> tuple[PairArrays, PairArrays | None]:
    """Random ``(train, held_out)`` split; ``eval_fraction=0`` gives ``(pairs, None)``."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(len(pairs) * eval_fraction))
    if n_eval == 0:
        return pairs, None
    if n_eval >= len(pairs):
        raise ValueError(f"{len(pairs)} pairs are too few to hold out {eval_fraction:.0%}")
    perm = np.random.default_rng(seed).permutation(len(pairs))
    return pairs.take(np.sort(perm[n_eval:])), pairs.take(np.sort(perm[:n_eval]))


def _resize_u8(img: np.ndarray, size: int | None) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 images from the data source, got {img.dtype}")
    if size is None or img.shape[:2] == (size, size):
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def load_pair_arrays(
    jsonl: str | Path,
    data_dir: str | Path,
    tokenizer: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]],
    *,
    image_root: str | Path | None = None,
    image_size: int | None = None,
    chunk: int = 256,
) -> PairArrays:
    """Reads a preference-pair JSONL + image folder through ``data.load_preference_pairs``
    (the TFDS array_record builder, prepared once under ``data_dir``).

    Images are resized (bicubic) to ``image_size x image_size`` when given, else
    they must all share one size. Everything is held in memory as uint8.
    """
    from prefgrpo_jax import data

    src = data.load_preference_pairs(jsonl, data_dir, image_root=image_root)
    prompts, labels, ims_a, ims_b = [], [], [], []
    for start in range(0, len(src), chunk):
        for r in src[start:start + chunk]:
            prompts.append(r["prompt"])
            labels.append(r["label"])
            ims_a.append(_resize_u8(r["image_a"], image_size))
            ims_b.append(_resize_u8(r["image_b"], image_size))
    shapes = {x.shape for x in ims_a + ims_b}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:5]}; pass image_size=")
    ids, mask = tokenizer(prompts)
    return PairArrays(ids, mask, np.stack(ims_a), np.stack(ims_b), np.asarray(labels))


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Reward-model training settings.

    train_backbone: False trains the head only, on features computed once.
    eval_every: also evaluate every this many steps (0: only at the end).
    """

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    train_backbone: bool = True
    eval_every: int = 0
    eval_batch_size: int = 256
    log_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"bad steps / batch sizes in {self}")


@dataclasses.dataclass
class TrainResult:
    model: Any
    history: list[dict[str, float]]
    eval_metrics: dict[str, float] | None
    wall_s: float


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decay on kernels / embeddings only) after global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def _unit(images: jax.Array) -> jax.Array:
    """uint8 0..255 or float [0, 1] -> fp32 [0, 1]."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)


def _accuracy_counts(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(correct, counted) over non-tie labels; a logit of exactly 0 counts half."""
    keep = labels != 0.5
    pred = np.sign(logits[keep])
    want = np.where(labels[keep] > 0.5, 1.0, -1.0)
    correct = np.sum(pred == want) + 0.5 * np.sum(pred == 0)
    return float(correct), int(np.sum(keep))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        pad = size - len(idx)
        yield idx, np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx


_JIT_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Jitted functions keyed by (graphdef, settings): repeated training / evaluation
    of same-shaped models reuses compilations. Unhashable keys are not cached."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 64:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = build()
    return _JIT_CACHE[key]


def _encoders(fns):
    return _cached(("encode", fns), lambda: (
        jax.jit(lambda p, x: fns.encode_images(p, _unit(x))), jax.jit(fns.encode_prompts)))


def _eval_logits_fn(fns, from_features: bool):
    if from_features:
        return _cached(("eval_features", fns), lambda: jax.jit(fns.pair_logits))
    return _cached(("eval_inputs", fns), lambda: jax.jit(
        lambda p, ids, m, a, b: fns.merge(p).pair_logits_from_inputs(ids, m, _unit(a), _unit(b))))


def _encode_all(fns, params, pairs: PairArrays, batch: int):
    """Features of every pair's prompt and images (frozen backbone), computed once."""
    enc_i, enc_t = _encoders(fns)
    out_p, out_a, out_b = [], [], []
    for idx, padded in _batches(len(pairs), batch):
        k = len(idx)
        out_p.append(np.asarray(enc_t(params, pairs.token_ids[padded], pairs.mask[padded]))[:k])
        ims = np.concatenate([pairs.image_a[padded], pairs.image_b[padded]])
        f = np.asarray(enc_i(params, ims))
        out_a.append(f[:len(padded)][:k])
        out_b.append(f[len(padded):][:k])
    return np.concatenate(out_p), np.concatenate(out_a), np.concatenate(out_b)


def evaluate_pairs(model, pairs: PairArrays, *, batch_size: int = 256,
                   features: tuple[np.ndarray, ...] | None = None) -> dict[str, float]:
    """Held-out metrics: ``accuracy`` (ties excluded), ``n_counted``, ``n``, ``loss`` (BCE).

    ``features``: precomputed ``(prompt, image_a, image_b)`` features (frozen
    backbone), else the images are encoded.
    """
    fns, params = split_reward_model(model)
    f = _eval_logits_fn(fns, features is not None)
    args = features if features is not None else (pairs.token_ids, pairs.mask, pairs.image_a,
                                                  pairs.image_b)
    logits = []
    for idx, padded in _batches(len(pairs), batch_size):
        logits.append(np.asarray(f(params, *(x[padded] for x in args)))[:len(idx)])
    logits = np.concatenate(logits).astype(np.float32)
    loss = float(np.mean(np.asarray(_bce(jnp.asarray(logits), jnp.asarray(pairs.label)))))
    correct, counted = _accuracy_counts(logits, pairs.label)
    return {"accuracy": correct / counted if counted else float("nan"),
            "n_counted": counted, "n": len(pairs), "loss": loss}


def _train_step_fn(fns, cfg: TrainConfig):
    """The jitted update ``(trainable, opt_state, frozen, inputs, labels) -> ...``."""
    tx = make_optimizer(cfg)

    if cfg.train_backbone:
        def logits_fn(trainable, frozen, ids, mask, a, b):
            return fns.merge(trainable).pair_logits_from_inputs(ids, mask, _unit(a), _unit(b))
    else:
        def logits_fn(trainable, frozen, p, fa, fb):
            return fns.pair_logits(nnx.State({"backbone": frozen, "head": trainable}), p, fa, fb)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, inputs, labels):
        def loss_fn(t):
            logits = logits_fn(t, frozen, *inputs)
            return jnp.mean(_bce(logits, labels)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        decided = labels != 0.5
        correct = jnp.where(jnp.sign(logits) == jnp.where(labels > 0.5, 1.0, -1.0), 1.0,
                            jnp.where(logits == 0, 0.5, 0.0))
        acc = jnp.sum(correct * decided) / jnp.maximum(jnp.sum(decided), 1)
        return trainable, opt_state, {"loss": loss, "accuracy": acc,
                                      "grad_norm": optax.global_norm(grads)}

    return tx, step


def train_reward_model(
    model,
    train: PairArrays,
    held_out: PairArrays | None = None,
    cfg: TrainConfig = TrainConfig(),
    *,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Trains ``model`` (pairwise or pointwise) with BCE on ``train``.

    Returns the trained model (a new object; the input model is left as it
    was), the logged history and the final held-out metrics (None without
    ``held_out``).
    """
    t_start = time.perf_counter()
    fns, params = split_reward_model(model)
    opt_key = dataclasses.replace(cfg, steps=0, eval_every=0, log_every=0, seed=0,
                                  batch_size=1, eval_batch_size=1)
    tx, step = _cached(("train", fns, opt_key), lambda: _train_step_fn(fns, cfg))
    rng = np.random.default_rng(cfg.seed)
    bs = min(cfg.batch_size, len(train))

    if cfg.train_backbone:
        # Copies: the step donates its inputs, and the caller's model must survive.
        trainable, frozen = jax.tree.map(jnp.array, params), None
        tr_inputs = (train.token_ids, train.mask, train.image_a, train.image_b)
        ev_features = None
    else:
        trainable, frozen = jax.tree.map(jnp.array, params["head"]), params["backbone"]
        tr_inputs = _encode_all(fns, params, train, cfg.eval_batch_size)
        ev_features = (_encode_all(fns, params, held_out, cfg.eval_batch_size)
                       if held_out is not None else None)
    opt_state = tx.init(trainable)

    def current_model(trainable):
        full = trainable if frozen is None else nnx.State({"backbone": frozen,
                                                           "head": trainable})
        return fns.merge(full)

    def evaluate(trainable):
        return evaluate_pairs(current_model(trainable), held_out, batch_size=cfg.eval_batch_size,
                              features=ev_features)

    history: list[dict[str, float]] = []
    eval_metrics = None
    perm, pos = rng.permutation(len(train)), 0
    window: list[dict[str, jax.Array]] = []
    for it in range(1, cfg.steps + 1):
        if pos + bs > len(train):
            perm, pos = rng.permutation(len(train)), 0
        idx = perm[pos:pos + bs]
        pos += bs
        batch = tuple(x[idx] for x in tr_inputs)
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch,
                                             train.label[idx])
        window.append(metrics)
        last = it == cfg.steps
        do_log = bool(cfg.log_every) and it % cfg.log_every == 0
        do_eval = held_out is not None and (last or (cfg.eval_every and it % cfg.eval_every == 0))
        if not (do_log or do_eval or last):
            continue
        rec: dict[str, float] = {"step": it}
        if do_log or last:
            rec.update({f"train/{k}": float(np.mean([float(m[k]) for m in window]))
                        for k in window[0]})
            window = []
        if do_eval:
            eval_metrics = evaluate(trainable)
            rec.update({f"eval/{k}": float(v) for k, v in eval_metrics.items()})
        rec["wall_s"] = time.perf_counter() - t_start
        history.append(rec)
        if log is not None:
            log(f"step {it}: " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items()
                                           if k != "step"))
    if held_out is not None and eval_metrics is None:  # steps == 0
        eval_metrics = evaluate(trainable)
    return TrainResult(current_model(trainable), history, eval_metrics,
                       time.perf_counter() - t_start)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _define_flags():
    from absl import flags

    flags.DEFINE_string("data", None, "Preference-pair JSONL ({prompt, image_a, image_b, label}).")
    flags.DEFINE_string("images", None, "Folder the JSONL's image paths are relative to "
                        "(default: the JSONL's folder).")
    flags.DEFINE_string("out", None, "Output directory (weights, config, metrics).")
    flags.DEFINE_string("data_dir", None, "TFDS cache directory (default: <out>/tfds).")
    flags.DEFINE_integer("steps", 1000, "Training steps.")
    flags.DEFINE_enum("model", "pairwise", ["pairwise", "pointwise"], "Head type.")
    flags.DEFINE_enum("backbone", "toy", ["toy", "clip"], "Backbone.")
    flags.DEFINE_string("clip_path", None, "transformers CLIPModel directory (--backbone=clip).")
    flags.DEFINE_boolean("train_backbone", None,
                         "Train the backbone too (default: yes for toy, no for clip).")
    flags.DEFINE_integer("batch_size", 64, "Pairs per step.")
    flags.DEFINE_float("lr", 1e-3, "AdamW learning rate.")
    flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
    flags.DEFINE_float("eval_fraction", 0.1, "Fraction of pairs held out.")
    flags.DEFINE_integer("image_size", None, "Resize images to this square size "
                         "(default: 32 for toy, the CLIP input size for clip).")
    flags.DEFINE_integer("hidden", 64, "Head width.")
    flags.DEFINE_integer("depth", 2, "Head MLP hidden layers.")
    flags.DEFINE_integer("max_len", 16, "Toy tokenizer: max prompt length in words.")
    flags.DEFINE_integer("log_every", 100, "Log every this many steps.")
    flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps (0: at the end).")
    flags.DEFINE_integer("seed", 0, "Seed (init, split, batches).")
    flags.mark_flags_as_required(["data", "out"])
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    F = FLAGS
    from prefgrpo_jax import data

    out = Path(F.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(F.data_dir) if F.data_dir else out / "tfds"
    clip = None
    if F.backbone == "clip":
        if not F.clip_path:
            raise app.UsageError("--backbone=clip needs --clip_path (a transformers CLIPModel dir)")
        from prefgrpo_jax.models.clip import load_clip

        clip = load_clip(F.clip_path)
        tokenizer = HFTokenizer.from_pretrained(
            F.clip_path, max_length=clip.cfg.text.max_position_embeddings)
        image_size = F.image_size or clip.cfg.vision.image_size
        train_backbone = bool(F.train_backbone) if F.train_backbone is not None else False
        toy = ToyBackboneConfig()
    else:
        records = data.parse_preference_pairs(F.data, F.images)
        tokenizer = WordTokenizer.from_texts([r.prompt for r in records], max_len=F.max_len)
        image_size = F.image_size or 32
        train_backbone = True if F.train_backbone is None else bool(F.train_backbone)
        toy = ToyBackboneConfig(vocab_size=tokenizer.vocab_size)
    print(f"reading pairs from {F.data} ...", flush=True)
    pairs = load_pair_arrays(F.data, data_dir, tokenizer, image_root=F.images,
                             image_size=image_size)
    train, held_out = split_pairs(pairs, F.eval_fraction, seed=F.seed)
    print(f"{len(pairs)} pairs: {len(train)} train, "
          f"{0 if held_out is None else len(held_out)} held out; images "
          f"{pairs.image_a.shape[1:]}", flush=True)
    cfg = RewardModelConfig(kind=F.model, backbone=F.backbone, hidden=F.hidden, depth=F.depth,
                            toy=toy)
    model = build_reward_model(cfg, rngs=nnx.Rngs(F.seed), clip=clip)
    tcfg = TrainConfig(steps=F.steps, batch_size=F.batch_size, learning_rate=F.lr,
                       weight_decay=F.weight_decay, train_backbone=train_backbone,
                       eval_every=F.eval_every, log_every=F.log_every, seed=F.seed)
    result = train_reward_model(model, train, held_out, tcfg,
                                log=lambda s: print(s, flush=True))
    extra = {"steps": F.steps, "train_pairs": len(train), "data": str(F.data),
             "train_backbone": train_backbone, "wall_s": result.wall_s}
    if result.eval_metrics is not None:
        extra.update({f"heldout_{k}": v for k, v in result.eval_metrics.items()})
    save_reward_model(result.model, out, tokenizer=tokenizer, extra=extra)
    (out / "history.json").write_text(json.dumps(result.history, indent=1))
    if result.eval_metrics is not None:
        m = result.eval_metrics
        print(f"final held-out accuracy: {m['accuracy']:.4f} "
              f"({m['n_counted']} non-tie pairs of {m['n']}), loss {m['loss']:.4f}")
    else:
        print("no held-out pairs (--eval_fraction=0)")
    print(f"saved {F.model} reward model to {out} ({result.wall_s:.1f} s)", flush=True)


FLAGS = None

if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
