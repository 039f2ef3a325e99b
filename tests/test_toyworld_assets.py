"""The toy world's shipped base model (``prefgrpo_jax/toyworld/assets``) and its pretraining code.

* the assets load through our ``FluxPipeline.from_pretrained`` and through
  diffusers' (which proves the directory layout), and the two give the same
  images from the same initial latents;
* base-model samples of held-out prompts are finite images in [0, 1] that the
  verifier scores above 0 (smoke: the measured numbers are in the assets' README);
* the prompt files, sizes and recorded metrics are what the README says;
* the pretraining functions (tokenizers, VAE and rectified-flow steps,
  sampling, scoring) run at tiny size, deterministically; the whole
  ``experiments/toyworld/pretrain.py --smoke`` run writes a loadable directory (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefgrpo_jax.pipeline import FluxPipeline
from prefgrpo_jax.toyworld import base_model as bm
from prefgrpo_jax.toyworld import scenes

ASSETS = Path(bm.__file__).resolve().parent / "assets"
BASE = ASSETS / "base"
HW = bm.IMAGE_SIZE


@pytest.fixture(scope="module")
def pipe():
    return FluxPipeline.from_pretrained(BASE, max_sequence_length=bm.MAX_SEQUENCE_LENGTH)


def test_assets_load_with_our_pipeline(pipe):
    t = pipe.transformer.cfg
    assert not t.guidance_embed
    assert (t.in_channels, t.context_dim, t.vec_dim) == (64, bm.TEXT_DIM, bm.TEXT_DIM)
    assert pipe.vae.cfg.latent_channels == 16 and pipe.vae.cfg.vae_scale_factor == 4
    assert pipe.latent_hw(HW, HW) == (8, 8)  # 16 tokens after 2x2 packing
    assert pipe.scheduler.use_dynamic_shifting is False
    assert pipe.clip_max_length == bm.MAX_SEQUENCE_LENGTH
    # Every prompt of the grammar is one token per word in both tokenizers.
    texts = [p.text for d in scenes.DIMENSIONS for p in scenes.all_prompts(d)]
    for text in texts[:: 37]:
        n = len(text.split())
        assert len(pipe.tokenizer(text)["input_ids"]) == n + 2
        assert len(pipe.tokenizer_2(text)["input_ids"]) == n + 1


def test_base_samples_are_images_the_verifier_scores(pipe):
    specs = scenes.heldout_prompts(2)  # 2 per dimension
    texts = [s.text for s in specs]
    images = np.asarray(pipe(texts, height=HW, width=HW, num_inference_steps=20, key=jax.random.key(0)))
    assert images.shape == (len(texts), HW, HW, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    table = bm.score_images(images, texts)
    assert table["overall"] > 0.0, table
    # Not a constant image: the model draws objects on the black background.
    assert (images.max(axis=(1, 2, 3)) > 0.5).all()


def test_assets_load_with_diffusers_and_match_ours(pipe):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FluxPipeline.from_pretrained(str(BASE), torch_dtype=torch.float32)
    assert ref.transformer.config.guidance_embeds is False
    texts = ["a red circle", "two blue triangles", "a green square and a yellow circle"]
    latents = jax.random.normal(jax.random.key(3), (len(texts), 16, 64), jnp.float32)
    ours = np.asarray(pipe(texts, height=HW, width=HW, num_inference_steps=4, latents=latents))
    with torch.no_grad():
        theirs = ref(
            texts, height=HW, width=HW, num_inference_steps=4, guidance_scale=1.0,
            max_sequence_length=bm.MAX_SEQUENCE_LENGTH, latents=torch.from_numpy(np.asarray(latents)),
            output_type="np",
        ).images
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_prompt_files():
    from prefgrpo_jax import data

    train = [json.loads(line) for line in (ASSETS / "prompts_train.jsonl").read_text().splitlines()]
    assert len(train) == sum(len(scenes.prompt_pool(d, "train")) for d in scenes.DIMENSIONS)
    for row in train:
        spec = scenes.parse_prompt(row["prompt"])
        assert row["category"] == spec.dimension and not scenes.is_heldout(spec)
    records = data.parse_prompt_file(ASSETS / "prompts_train.jsonl")
    assert {r.category for r in records} == set(scenes.DIMENSIONS)
    held = [json.loads(line) for line in (ASSETS / "prompts_heldout.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in held] == [s.text for s in scenes.heldout_prompts(50)]


def test_asset_sizes_and_recorded_metrics():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 10e6, f"assets are {total / 1e6:.1f} MB"
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".pth") for p in files)  # safetensors only
    m = json.loads((ASSETS / "metrics.json").read_text())
    assert not m["smoke"]
    # The VAE is a near-faithful codec; the base model is well above 0 and well below 100%.
    assert m["vae_recon_heldout"]["overall"] > 0.9
    best = m["base_heldout"][m["recommended_ode"]]
    assert 0.15 < best["overall"] < 0.8, best
    assert set(best) == {*scenes.DIMENSIONS, "overall"}
    readme = (ASSETS / "README.md").read_text()
    assert "experiments/toyworld/pretrain.py" in readme and f"{100 * best['overall']:.1f}" in readme


# ---------------------------------------------------------------------------
# The pretraining code at tiny size.


def test_rectified_flow_loss_is_zero_for_the_exact_velocity():
    # For a single data point x0, the flow's velocity is known: v = (x_t - x0) / t.
    x0 = jax.random.normal(jax.random.key(0), (8, 16, 64))
    loss = bm.rectified_flow_loss(lambda x, t: (x - x0) / t[:, None, None], x0, jax.random.key(1), "logit_normal")
    assert float(loss) < 1e-8
    assert float(bm.rectified_flow_loss(lambda x, t: jnp.zeros_like(x), x0, jax.random.key(1), "uniform")) > 1.0
    t = bm.sample_t(jax.random.key(2), 10_000, "logit_normal")
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0 and abs(float(jnp.median(t)) - 0.5) < 0.02


def test_pretraining_functions_smoke(tmp_path):
    from transformers import AutoTokenizer

    from prefgrpo_jax.models.flux import FluxTransformer
    from prefgrpo_jax.pipeline import SchedulerSettings

    clip_dir, t5_dir = bm.save_tokenizers(tmp_path)  # also checks one token per word
    clip, t5 = bm.init_text_encoders(0)
    vcfg = bm.VAETrainConfig(steps=2, batch=2, log_every=1)
    vaes = [bm.train_vae(vcfg, 0, block_out_channels=(8, 8, 8), log=lambda s: None) for _ in range(2)]
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                              nnx.state(vaes[0]), nnx.state(vaes[1]))
    assert all(jax.tree.leaves(chex_equal)), "VAE training is not deterministic"
    vae = vaes[0]
    images, texts = bm.sample_batch(np.random.default_rng(0), 4)
    calib = bm.calibrate_vae(vae, images)
    assert vae.scaling_factor == calib["scaling_factor"] == vae.cfg.scaling_factor
    latents = vae.encode_to_latents(jnp.asarray(images))
    np.testing.assert_allclose(float(jnp.mean(latents)), 0.0, atol=1e-4)
    np.testing.assert_allclose(float(jnp.std(latents)), 1.0, atol=1e-3)
    assert bm.reconstruct(vae, images).shape == images.shape

    pipe = FluxPipeline(
        FluxTransformer(bm.flux_config(hidden_size=32), rngs=nnx.Rngs(0)), vae, clip, t5,
        AutoTokenizer.from_pretrained(str(clip_dir)), AutoTokenizer.from_pretrained(str(t5_dir)),
        scheduler=SchedulerSettings(use_dynamic_shifting=False, shift=1.0),
        max_sequence_length=bm.MAX_SEQUENCE_LENGTH,
    )
    report = bm.text_feature_report(pipe.encode_prompt, sorted({*texts, "a red circle", "a blue circle"}))
    assert report["pooled_cos_max"] < 0.9999 and report["t5_min_rel_dist"] > 0.01
    before = jax.tree.map(np.asarray, nnx.state(pipe.transformer, nnx.Param))
    logs = []
    bm.train_flow(pipe, bm.FlowTrainConfig(steps=2, batch=2, log_every=1), 0, log=logs.append)
    after = nnx.state(pipe.transformer, nnx.Param)
    assert len(logs) == 2 and all(np.isfinite(float(s.split("loss ")[1].split()[0])) for s in logs)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    samples = bm.sample_images(pipe, texts[:2], jax.random.key(0), num_steps=2)
    assert samples.shape == (2, HW, HW, 3) and np.isfinite(samples).all()
    sde = bm.sample_images(pipe, texts[:2], jax.random.key(0), num_steps=2, mode="flow", shift=3.0)
    assert np.isfinite(sde).all()
    table = bm.score_images(samples, texts[:2])
    assert 0.0 <= table["overall"] <= 1.0


@pytest.mark.slow
def test_pretrain_script_smoke(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "toy_pretrain", Path(__file__).resolve().parents[1] / "experiments" / "toyworld" / "pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(["--smoke", f"--out={tmp_path}"])
    for name in ("README.md", "metrics.json", "prompts_train.jsonl", "prompts_heldout.jsonl", "samples.png",
                 "base/model_index.json", "base/scheduler/scheduler_config.json"):
        assert (tmp_path / name).is_file(), name
    loaded = FluxPipeline.from_pretrained(tmp_path / "base", max_sequence_length=bm.MAX_SEQUENCE_LENGTH)
    assert loaded.transformer.cfg.hidden_size == metrics["hidden_size"]
    assert json.loads((tmp_path / "metrics.json").read_text())["smoke"] is True
