"""Trains the toy world's two *imperfect* proxy reward models.

    python experiments/toyworld/train_proxies.py            # writes the shipped proxies

Writes ``--out/reward_pairwise/`` (a pairwise preference model, PPRM) and
``--out/reward_pointwise/`` (a pointwise score model, Bradley-Terry), both
saved with ``prefgrpo_jax.rewards.pairwise.save_reward_model`` and loadable as
the ``pairwise_model`` / ``pointwise_model`` reward sources
(``reward.options = {"pairwise_model": {"path": ...}}``).

How they are made (everything derives from ``--seed``):

1. **Base-model images.** ``--num_prompts`` training prompts (a seeded sample of
   ``--prompts``) each get one group of ``--group_size`` images from the BASE
   model with the SDE sampler GRPO rolls out with (the study config's
   ``train.*`` sampler fields: flow SDE, eta, steps), so the pairs are
   within-prompt, like the comparisons GRPO asks for. By default every image
   has its own initial noise (``--same_noise=0``): GRPO's groups share one
   noise, but such near-identical images are mostly verifier ties and teach
   the proxies little.
2. **Verifier labels.** Every image is scored by the toy verifier
   (``verify``: fraction of the prompt's testpoints passed). Every unordered
   pair of a group with *different* scores becomes a pair labelled 1 (the
   higher-scoring image wins), presented in a random order. Pairs with equal
   scores are ties: ``--ties=drop`` (default; like a judge that must name a
   winner, the model never sees them) or ``--ties=half`` (label 0.5).
3. **Controlled label noise.** Each non-tie label is flipped with probability
   ``--label_noise`` (default 0.2), independently; the flips are recorded.
4. **Same data, same budget.** A pairwise and a pointwise model with the same
   toy backbone, width and training settings are trained on the same noisy
   pairs (``train_reward_model``). Held-out pairs come from prompts (groups)
   not used for training; accuracy is reported against the clean verifier
   labels and against the noisy ones.

The models are kept small and trained briefly on purpose: they are proxies of
the verifier with a measured accuracy well below 100%, which is where reward
hacking can happen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ASSETS = REPO / "prefgrpo_jax" / "toyworld" / "assets"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ASSETS / "base"), help="base model (diffusers FLUX dir)")
    p.add_argument("--prompts", default=str(ASSETS / "prompts_train.jsonl"), help="training prompts (.jsonl)")
    p.add_argument("--out", default=str(ASSETS), help="writes <out>/reward_pairwise and <out>/reward_pointwise")
    p.add_argument("--num_prompts", type=int, default=600, help="prompts (groups) sampled from the base model")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--sample_steps", type=int, default=10, help="SDE steps (as configs/tiny.py)")
    p.add_argument("--eta", type=float, default=0.7)
    p.add_argument("--same_noise", type=int, default=0,
                   help="1: one initial noise per group (as GRPO rollouts); 0: independent noises "
                        "(more varied pairs, fewer ties)")
    p.add_argument("--groups_per_prompt", type=int, default=1)
    p.add_argument("--label_noise", type=float, default=0.2, help="probability of flipping a non-tie label")
    p.add_argument("--ties", choices=("drop", "half"), default="drop")
    p.add_argument("--heldout_fraction", type=float, default=0.15, help="fraction of groups held out")
    p.add_argument("--steps", type=int, default=600, help="reward-model training steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--eval_every", type=int, default=0, help="held-out (noisy-label) evaluation every N steps")
    p.add_argument("--channels", default="16,32,64", help="toy backbone conv channels")
    p.add_argument("--feature_dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def study_sampler_config(base: str | Path, *, num_steps: int, eta: float, group_size: int):
    """A config (configs/tiny.py shape) whose ``train.*`` sampler fields sample like GRPO."""
    from experiments.toyworld.study import load_tiny_config

    c = load_tiny_config()
    c.model.path = str(base)
    c.train.num_steps = num_steps
    c.train.eta = eta
    c.train.group_size = group_size
    return c


def sample_groups(config, prompts: list[str], key, *, chunk: int = 32) -> np.ndarray:
    """Images ``[N, G, H, W, 3]`` in [0, 1]: one group per prompt, sampled exactly as
    ``Trainer.step`` rolls out (SDE, ``config.train`` sampler, one noise per group)."""
    import jax
    from flax import nnx

    from prefgrpo_jax import sampling
    from prefgrpo_jax.models import autoencoder
    from prefgrpo_jax.state import load_pipeline
    from prefgrpo_jax.train import sampler_config

    t = config.train
    g = int(t.group_size)
    pipe = load_pipeline(config)
    h, w = pipe.latent_hw(t.height, t.width)
    latent_shape = ((h // 2) * (w // 2), pipe.transformer.cfg.in_channels)
    sampler = sampler_config(config, latent_shape[0])
    _, params = nnx.split(pipe.transformer)
    vae_graph, vae_params = nnx.split(pipe.vae)
    decode = jax.jit(lambda vp, x: nnx.merge(vae_graph, vp).decode(autoencoder.unpack_latents(x, h, w)))
    out = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        padded = part + [part[-1]] * (chunk - len(part))  # one compiled shape
        txt, txt_ids, pooled = pipe.encode_prompt(padded)
        cond = pipe.conditioning(txt, txt_ids, pooled, t.height, t.width, t.get("guidance_scale"))
        cond = jax.tree.map(lambda a: np.repeat(np.asarray(a), g, axis=0), cond)
        traj = sampling.sample_trajectory(pipe.velocity_fn, sampler, params,
                                          jax.random.fold_in(key, start), cond, latent_shape)
        images = np.asarray(decode(vae_params, traj.latents[:, -1]))
        out.append(images.reshape(chunk, g, *images.shape[1:])[: len(part)])
    return np.concatenate(out)


def make_pairs(scores: np.ndarray, rng: np.random.Generator, *, label_noise: float, ties: str):
    """All within-group pairs of ``scores [N, G]``.

    Returns a dict of arrays over pairs: ``group``, ``a``, ``b`` (image indices),
    ``clean`` (verifier label: 1 a wins, 0 b wins, 0.5 tie), ``label`` (after
    flipping each non-tie label with probability ``label_noise``), ``flipped``.
    """
    n, g = scores.shape
    iu, ju = np.triu_indices(g, k=1)
    group = np.repeat(np.arange(n), len(iu))
    a, b = np.tile(iu, n), np.tile(ju, n)
    swap = rng.random(len(a)) < 0.5  # random presentation order
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    sa, sb = scores[group, a], scores[group, b]
    clean = np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5)).astype(np.float32)
    if ties == "drop":
        keep = clean != 0.5
        group, a, b, clean = group[keep], a[keep], b[keep], clean[keep]
    flipped = (clean != 0.5) & (rng.random(len(clean)) < label_noise)
    label = np.where(flipped, 1.0 - clean, clean).astype(np.float32)
    return {"group": group, "a": a, "b": b, "clean": clean, "label": label, "flipped": flipped}


def toy_tokenizer(max_len: int = 16):
    """Word tokenizer over the whole toy grammar (training and held-out prompts)."""
    from prefgrpo_jax.rewards.pairwise import WordTokenizer
    from prefgrpo_jax.toyworld import scenes

    texts = [s.text for d in scenes.DIMENSIONS for s in scenes.all_prompts(d)]
    return WordTokenizer.from_texts(texts, max_len=max_len)


def pair_arrays(pairs: dict, idx: np.ndarray, prompts: list[str], images_u8: np.ndarray, tokenizer,
                labels: str = "label"):
    from prefgrpo_jax.rewards.train_reward import PairArrays

    grp, a, b = pairs["group"][idx], pairs["a"][idx], pairs["b"][idx]
    ids, mask = tokenizer([prompts[i] for i in grp])
    return PairArrays(ids, mask, images_u8[grp, a], images_u8[grp, b], pairs[labels][idx])


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from prefgrpo_jax.rewards.pairwise import (
        RewardModelConfig,
        ToyBackboneConfig,
        build_reward_model,
        save_reward_model,
    )
    from prefgrpo_jax.rewards.train_reward import TrainConfig, evaluate_pairs, train_reward_model
    from prefgrpo_jax.toyworld.verify import verify_batch

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    rng = np.random.default_rng([args.seed, 101])
    all_prompts = read_prompts(args.prompts)
    pick = rng.choice(len(all_prompts), size=min(args.num_prompts, len(all_prompts)), replace=False)
    prompts = [all_prompts[i] for i in sorted(pick)]
    prompts = prompts * args.groups_per_prompt
    config = study_sampler_config(args.base, num_steps=args.sample_steps, eta=args.eta,
                                  group_size=args.group_size)
    config.train.init_same_noise = bool(args.same_noise)

    t0 = time.perf_counter()
    images = sample_groups(config, prompts, jax.random.key(args.seed + 202))
    n, g = images.shape[:2]
    sample_s = time.perf_counter() - t0
    flat_prompts = [p for p in prompts for _ in range(g)]
    scores = np.asarray(verify_batch(images.reshape(n * g, *images.shape[2:]), flat_prompts),
                        np.float32).reshape(n, g)
    log(f"sampled {n} groups x {g} images from {args.base} in {sample_s:.0f}s; verifier mean "
        f"{scores.mean():.3f}, mean within-group std {scores.std(axis=1).mean():.3f}")

    pairs = make_pairs(scores, rng, label_noise=args.label_noise, ties=args.ties)
    all_pairs = len(np.triu_indices(g, 1)[0]) * n
    n_held = max(1, int(round(args.heldout_fraction * n)))
    held_groups = set(rng.choice(n, size=n_held, replace=False).tolist())
    is_held = np.array([grp in held_groups for grp in pairs["group"]])
    tr_idx, ev_idx = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    if len(tr_idx) == 0 or len(ev_idx) == 0:
        raise SystemExit(f"too few non-tie pairs ({len(pairs['label'])} of {all_pairs}): "
                         "sample more prompts or use --ties=half")
    images_u8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    tok = toy_tokenizer()
    train = pair_arrays(pairs, tr_idx, prompts, images_u8, tok)
    held_noisy = pair_arrays(pairs, ev_idx, prompts, images_u8, tok)
    held_clean = pair_arrays(pairs, ev_idx, prompts, images_u8, tok, labels="clean")
    decided = pairs["clean"] != 0.5
    data = {
        "groups": n, "group_size": g, "all_within_group_pairs": int(all_pairs),
        "tie_pairs": int(all_pairs - np.sum(decided)) if args.ties == "drop" else int(np.sum(~decided)),
        "pairs_kept": int(len(pairs["label"])), "train_pairs": int(len(tr_idx)),
        "heldout_pairs": int(len(ev_idx)), "heldout_groups": n_held,
        "label_noise": args.label_noise, "ties": args.ties,
        "flipped_fraction_train": float(pairs["flipped"][tr_idx].mean()),
        "base_verifier_mean": float(scores.mean()),
        "base_verifier_group_std": float(scores.std(axis=1).mean()),
        "sample_seconds": sample_s,
    }
    log(f"pairs: {data}")

    channels = tuple(int(c) for c in args.channels.split(","))
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                       weight_decay=args.weight_decay, train_backbone=True, eval_every=args.eval_every,
                       log_every=max(1, args.steps // 5), seed=args.seed)
    report = {"data": data, "train_config": tcfg.__dict__, "models": {},
              "command": " ".join(["python", "experiments/toyworld/train_proxies.py", *(argv or sys.argv[1:])]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
                         f"({jax.devices()[0].platform})"}
    out = Path(args.out)
    for kind in ("pairwise", "pointwise"):
        cfg = RewardModelConfig(kind=kind, backbone="toy", hidden=args.hidden, depth=2,
                                toy=ToyBackboneConfig(vocab_size=tok.vocab_size, channels=channels,
                                                      feature_dim=args.feature_dim))
        model = build_reward_model(cfg, rngs=nnx.Rngs(args.seed))
        t0 = time.perf_counter()
        res = train_reward_model(model, train, held_noisy, tcfg, log=lambda s, k=kind: log(f"{k}: {s}"))
        clean = evaluate_pairs(res.model, held_clean)
        m = {"heldout_accuracy_vs_verifier": clean["accuracy"],
             "heldout_accuracy_vs_noisy_labels": res.eval_metrics["accuracy"],
             "heldout_loss_noisy": res.eval_metrics["loss"],
             "train_accuracy_last": res.history[-1].get("train/accuracy"),
             "train_seconds": time.perf_counter() - t0}
        report["models"][kind] = m
        save_reward_model(res.model, out / f"reward_{kind}", tokenizer=tok,
                          extra={**m, **{f"data_{k}": v for k, v in data.items()},
                                 "base_model": str(args.base), "seed": args.seed,
                                 "command": report["command"]})
        log(f"{kind}: held-out accuracy vs verifier {clean['accuracy']:.3f} "
            f"(vs noisy labels {res.eval_metrics['accuracy']:.3f}); saved to {out / f'reward_{kind}'}")
    report["total_seconds"] = time.perf_counter() - t_start
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=float))
