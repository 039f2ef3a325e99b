"""Regenerates the toy world's shipped base model and assets.

    python experiments/toyworld/pretrain.py --out=prefgrpo_jax/toyworld/assets

Writes, under ``--out``:

* ``base/``: a diffusers-format FLUX directory (``prefgrpo_jax.export.save_pretrained``):
  toy tokenizers, frozen random text encoders, the trained VAE and the
  rectified-flow-pretrained transformer; ``scheduler/`` holds the recommended
  sampling schedule;
* ``prompts_train.jsonl`` / ``prompts_heldout.jsonl``: ``{"prompt", "category"}``
  per line (category = the toy world's dimension);
* ``metrics.json``: every measured number (VAE reconstruction verifier scores,
  base-model verifier scores per dimension under several samplers, text
  feature distances, losses, wall times);
* ``samples.png``: base-model ODE samples for held-out prompts;
* ``README.md``: what is there, how it was made, the numbers.

Everything derives from ``--seed``: a rerun on the same machine and library
versions reproduces the files. ``--smoke`` shrinks every stage to seconds (for
tests; the result is not a usable model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="prefgrpo_jax/toyworld/assets", help="asset directory (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=None)
    p.add_argument("--vae_batch", type=int, default=None)
    p.add_argument("--flow_steps", type=int, default=None)
    p.add_argument("--flow_batch", type=int, default=None)
    p.add_argument("--hidden_size", type=int, default=96)
    p.add_argument("--eval_per_dim", type=int, default=None, help="held-out prompts per dimension")
    p.add_argument("--eval_every", type=int, default=None, help="flow steps between progress evaluations")
    p.add_argument("--shift", type=float, default=None,
                   help="SD3 shift written to scheduler/ (default: the best measured ODE schedule)")
    p.add_argument("--smoke", action="store_true", help="seconds-long run of every stage (tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from prefgrpo_jax import export
    from prefgrpo_jax.pipeline import FluxPipeline, SchedulerSettings
    from prefgrpo_jax.toyworld import base_model as bm
    from prefgrpo_jax.toyworld import scenes
    from prefgrpo_jax.toyworld.render import render_batch

    t_start = time.perf_counter()
    smoke = args.smoke
    vae_cfg = bm.VAETrainConfig(
        steps=args.vae_steps or (2 if smoke else bm.VAETrainConfig.steps),
        batch=args.vae_batch or (4 if smoke else bm.VAETrainConfig.batch),
        log_every=1 if smoke else 100,
    )
    flow_cfg = bm.FlowTrainConfig(
        steps=args.flow_steps or (2 if smoke else bm.FlowTrainConfig.steps),
        batch=args.flow_batch or (4 if smoke else bm.FlowTrainConfig.batch),
        log_every=1 if smoke else 100,
    )
    eval_per_dim = args.eval_per_dim or (2 if smoke else 50)
    eval_every = args.eval_every if args.eval_every is not None else (0 if smoke else 1000)
    hidden = 32 if smoke else args.hidden_size
    out = Path(args.out)
    base = out / "base"
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {
        "seed": args.seed, "smoke": smoke, "vae_train": dataclasses.asdict(vae_cfg),
        "flow_train": dataclasses.asdict(flow_cfg), "hidden_size": hidden,
        "jax": jax.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # 1. Tokenizers.
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir, t5_dir = bm.save_tokenizers(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(clip_dir))
        tokenizer_2 = AutoTokenizer.from_pretrained(str(t5_dir))
    log(f"tokenizers: CLIP {len(tokenizer)} ids, T5 {len(tokenizer_2)} ids, one token per word")

    # 2. Frozen text encoders (random, seeded).
    clip, t5 = bm.init_text_encoders(args.seed)

    # 3. VAE.
    t0 = time.perf_counter()
    vae_curve: list = []
    vae = bm.train_vae(vae_cfg, args.seed, log=log, history=vae_curve)
    metrics["vae_loss_curve"] = vae_curve
    calib_images, _ = bm.sample_batch(np.random.default_rng([args.seed, 3]), 64 if smoke else 1024)
    metrics["vae_latent_calibration"] = bm.calibrate_vae(vae, calib_images)
    metrics["vae_train_seconds"] = time.perf_counter() - t0
    held_specs = scenes.heldout_prompts(eval_per_dim)
    held_texts = [s.text for s in held_specs]
    held_images = render_batch(
        [scenes.sample_scene(s, np.random.default_rng([args.seed, 4, i])) for i, s in enumerate(held_specs)]
    )
    recon = bm.reconstruct(vae, held_images)
    metrics["vae_recon_heldout"] = bm.score_images(recon, held_texts)
    metrics["vae_recon_heldout_mse"] = float(np.mean((recon - held_images) ** 2))
    metrics["renders_heldout"] = bm.score_images(held_images, held_texts)
    train_rng = np.random.default_rng([args.seed, 5])
    train_specs = [scenes.sample_prompt(train_rng, d) for d in scenes.DIMENSIONS for _ in range(eval_per_dim)]
    train_texts = [s.text for s in train_specs]
    train_images = render_batch([scenes.sample_scene(s, train_rng) for s in train_specs])
    metrics["vae_recon_train"] = bm.score_images(bm.reconstruct(vae, train_images), train_texts)
    log(f"VAE trained in {metrics['vae_train_seconds']:.0f}s; {metrics['vae_latent_calibration']}")
    log(f"VAE reconstructions, verifier on held-out scenes: {_fmt(metrics['vae_recon_heldout'])} "
        f"(originals {_fmt(metrics['renders_heldout'])}); MSE {metrics['vae_recon_heldout_mse']:.5f}")

    # 4. The pipeline with a fresh transformer.
    transformer = bm.flux_config(hidden_size=hidden)
    from prefgrpo_jax.models.flux import FluxTransformer

    pipe = FluxPipeline(
        FluxTransformer(transformer, rngs=nnx.Rngs(args.seed + 4)), vae, clip, t5, tokenizer, tokenizer_2,
        scheduler=SchedulerSettings(use_dynamic_shifting=False, shift=args.shift or 1.0),
        max_sequence_length=bm.MAX_SEQUENCE_LENGTH,
    )
    metrics["transformer_params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(pipe.transformer, nnx.Param))))
    feat_texts = held_texts[:: max(1, len(held_texts) // 60)] + train_texts[:60]
    feat_texts = sorted(set(feat_texts))
    metrics["text_features"] = bm.text_feature_report(pipe.encode_prompt, feat_texts)
    log(f"text features over {len(feat_texts)} prompts: {_fmt(metrics['text_features'], 3)}")

    # 5. Rectified-flow pretraining, with progress evaluations.
    curve = []
    progress_texts = bm.heldout_texts(10)

    def progress(step: int) -> None:
        imgs = bm.sample_images(pipe, progress_texts, jax.random.key(args.seed + 7), num_steps=20)
        table = bm.score_images(imgs, progress_texts)
        curve.append({"step": step, **table})
        log(f"  eval @ {step}: held-out verifier (10/dim, ODE 20 steps) {_fmt(table)}")

    t0 = time.perf_counter()
    loss_curve = bm.train_flow(pipe, flow_cfg, args.seed, log=log, eval_fn=progress, eval_every=eval_every)
    metrics["flow_loss_curve"] = loss_curve
    metrics["final_flow_loss"] = loss_curve[-1]["loss"]
    metrics["flow_train_seconds"] = time.perf_counter() - t0
    metrics["flow_eval_curve"] = curve
    log(f"transformer trained in {metrics['flow_train_seconds']:.0f}s")

    # 6. Evaluation of the base model on the held-out prompts under several samplers.
    t0 = time.perf_counter()
    samplers = {
        "ode20_sd3_shift1": dict(num_steps=20, schedule="sd3", shift=1.0),
        "ode20_sd3_shift3": dict(num_steps=20, schedule="sd3", shift=3.0),
        "ode10_sd3_shift1": dict(num_steps=10, schedule="sd3", shift=1.0),
        "sde10_flow_eta0.7_shift3": dict(num_steps=10, schedule="sd3", shift=3.0, mode="flow", eta=0.7),
        "sde10_flow_eta0.7_shift1": dict(num_steps=10, schedule="sd3", shift=1.0, mode="flow", eta=0.7),
    }
    if smoke:
        samplers = {k: samplers[k] for k in ("ode20_sd3_shift1",)}
    eval_key = jax.random.key(args.seed + 11)
    results = {}
    sample_cache = {}
    for name, kw in samplers.items():
        imgs = bm.sample_images(pipe, held_texts, eval_key, **kw)
        sample_cache[name] = imgs
        results[name] = bm.score_images(imgs, held_texts)
        log(f"base model, held-out ({eval_per_dim}/dim), {name}: {_fmt(results[name])}")
    metrics["base_heldout"] = results
    ode = {k: v for k, v in results.items() if k.startswith("ode20")}
    best = max(ode, key=lambda k: ode[k]["overall"])
    metrics["recommended_ode"] = best
    train_eval = bm.sample_images(pipe, train_texts, eval_key, **samplers[best])
    metrics["base_train_prompts"] = bm.score_images(train_eval, train_texts)
    log(f"base model, training prompts, {best}: {_fmt(metrics['base_train_prompts'])}")
    metrics["eval_seconds"] = time.perf_counter() - t0

    # 7. Save. The scheduler records the best ODE schedule unless --shift was given.
    shift = args.shift or samplers[best]["shift"]
    pipe.scheduler = SchedulerSettings(use_dynamic_shifting=False, shift=float(shift))
    export.save_pretrained(pipe, base)
    _write_prompts(out / "prompts_train.jsonl", [p for d in scenes.DIMENSIONS for p in scenes.prompt_pool(d, "train")])
    _write_prompts(out / "prompts_heldout.jsonl", scenes.heldout_prompts(50))
    per_row = min(eval_per_dim, 8)
    first = [d * eval_per_dim + j for d in range(len(scenes.DIMENSIONS)) for j in range(per_row)]
    _save_grid(out / "samples.png", sample_cache[best][first], per_row)
    metrics["total_seconds"] = time.perf_counter() - t_start
    metrics["command"] = " ".join(["python", "experiments/toyworld/pretrain.py", *(argv or sys.argv[1:])])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    _write_readme(out / "README.md", metrics)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    log(f"wrote {len(sizes)} files, {sum(sizes.values()) / 1e6:.2f} MB, to {out}")
    return metrics


def _fmt(table: dict, digits: int = 2) -> str:
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in table.items())


def _write_prompts(path: Path, specs) -> None:
    with path.open("w") as f:
        for s in specs:
            f.write(json.dumps({"prompt": s.text, "category": s.dimension}) + "\n")


def _save_grid(path: Path, images: np.ndarray, cols: int) -> None:
    """Rows of ``cols`` images (one row per dimension), 2 px gaps, x2 upscaled."""
    from PIL import Image

    n = len(images)
    rows = (n + cols - 1) // cols
    s = images.shape[1] * 2
    grid = np.full((rows * (s + 2), cols * (s + 2), 3), 0.5, np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        up = np.repeat(np.repeat(im, 2, 0), 2, 1)
        grid[r * (s + 2) : r * (s + 2) + s, c * (s + 2) : c * (s + 2) + s] = up
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path, optimize=True)


def _write_readme(path: Path, m: dict) -> None:
    from prefgrpo_jax.toyworld import scenes

    def row(name, t):
        return f"| {name} | " + " | ".join(f"{100 * t[d]:.1f}" for d in (*scenes.DIMENSIONS, "overall")) + " |"

    header = "| | " + " | ".join(scenes.DIMENSIONS) + " | overall |\n|---|" + "---|" * (len(scenes.DIMENSIONS) + 1)
    base_rows = "\n".join(row(k, v) for k, v in m["base_heldout"].items())
    curve = "\n".join(row(f"step {c['step']}", c) for c in m["flow_eval_curve"]) or "(none)"
    v, f = m["vae_train"], m["flow_train"]
    text = f"""# Toy world assets

Generated by `experiments/toyworld/pretrain.py`; do not edit by hand. Regenerate with

    {m['command']}

(seed {m['seed']}; same machine + library versions -> same files. Measured on
{m['machine']}, jax {m['jax']}: total wall time {m['total_seconds'] / 60:.1f} min, of which VAE
{m['vae_train_seconds'] / 60:.1f} min, transformer {m['flow_train_seconds'] / 60:.1f} min,
evaluation {m['eval_seconds'] / 60:.1f} min.)

## Files

* `base/`: diffusers-format FLUX pipeline directory, loads with
  `prefgrpo_jax.pipeline.FluxPipeline.from_pretrained(path, max_sequence_length=16)`
  and with diffusers' `FluxPipeline.from_pretrained`. fp32 weights.
  * `tokenizer/`, `tokenizer_2/`: CLIP BPE (600 ids) and T5 Unigram (256 ids)
    tokenizers trained on the training prompts (`prefgrpo_jax.toyworld.tokenizers`),
    one token per word, `model_max_length` 16 (longest prompt: 10 CLIP / 9 T5 tokens).
  * `text_encoder/` (CLIP text, 2 layers, width 32) and `text_encoder_2/`
    (T5 encoder, 2 layers, width 32): **random, frozen** (seed {m['seed']}; CLIP token
    embeddings with std 1 and a zero EOS embedding, so the pooled vector is
    gathered from the prompt's tokens). The transformer learns to read their features.
    Distinctness over {len(m['text_features']) and 'a sample of'} prompts: {_fmt(m['text_features'], 3)}
    (cosine similarities between different prompts; smallest distance between
    two prompts relative to the mean feature norm).
  * `vae/`: FLUX-style AutoencoderKL, 16 latent channels, block_out_channels
    (16, 32, 32): 32x32 images -> 8x8x16 latents -> 16 tokens of 64 channels.
    Trained {v['steps']} steps x {v['batch']} fresh renders of random scenes of *all*
    prompts (AdamW lr {v['lr']}), L2 + L1 reconstruction of a posterior sample +
    {v['kl_weight']} x KL. It is the world's image codec, so it sees every
    colour-shape pair (trained on the training split only it decoded held-out
    green circles as squares); the transformer never sees held-out pairs.
    shift/scale set so model-space latents are standardised:
    {m['vae_latent_calibration']}.
  * `transformer/`: `FluxTransformer` hidden {m['hidden_size']}, 2 heads, 2 double + 2 single
    blocks, RoPE axes {list(_axes(m['hidden_size']))}, {m['transformer_params']:,} parameters,
    **guidance_embed False** (no guidance distillation; the pipeline ignores
    `guidance_scale`). Rectified-flow loss `|v(x_t,t) - (noise - x0)|^2`,
    `x_t = (1-t) x0 + t noise`, t ~ SD3 logit-normal `sigmoid(N(0,1))`;
    {f['steps']} steps x {f['batch']} fresh renders of training prompts (AdamW lr {f['lr']},
    warmup {f['warmup']}, cosine to 10%, grad-norm clip 1); the shipped weights are the
    EMA ({f['ema_decay']}, with warm-up) of the trained ones. Prompt features are
    `encode_prompt` at max_sequence_length 16. Stopped early on purpose: the
    loss was still falling ({m['final_flow_loss']:.4f} at the end).
  * `scheduler/`: FlowMatchEulerDiscreteScheduler with the best measured ODE
    schedule ({m['recommended_ode']}).
* `prompts_train.jsonl`: the {len(scenes.DIMENSIONS)} dimensions' training prompts
  (`{{"prompt", "category"}}`, category = dimension), the transformer's training prompts.
* `prompts_heldout.jsonl`: `scenes.heldout_prompts(50)` (the fixed evaluation set).
* `samples.png`: base-model samples ({m['recommended_ode']}) of the first 8 held-out prompts of
  each dimension, one row per dimension ({', '.join(scenes.DIMENSIONS)}).
* `metrics.json`: every number below, machine-readable.

## Measured (toy verifier, % of testpoints passed; held-out prompts)

VAE reconstructions of rendered held-out scenes (originals score
{100 * m['renders_heldout']['overall']:.1f}); MSE {m['vae_recon_heldout_mse']:.5f}:

{header}
{row('VAE reconstruction (held-out)', m['vae_recon_heldout'])}
{row('VAE reconstruction (train prompts)', m['vae_recon_train'])}

Base model samples by sampler (`ode20_sd3_shift1` = 20 Euler steps, SD3
schedule shift 1; `sde10_flow_eta0.7_shift3` = GRPO's SDE sampler, 10 steps,
eta 0.7, shift 3):

{header}
{base_rows}
{row('training prompts, ' + m['recommended_ode'], m['base_train_prompts'])}

During pretraining (10 held-out prompts per dimension, ODE 20 steps, shift 1):

{header}
{curve}
"""
    path.write_text(text)


def _axes(hidden: int) -> tuple[int, ...]:
    from prefgrpo_jax.toyworld import base_model as bm

    return bm.flux_config(hidden_size=hidden).axes_dim


if __name__ == "__main__":
    main()
