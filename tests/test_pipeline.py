"""FluxPipeline: loading a diffusers directory, prompt encoding, ODE sampling parity."""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prefgrpo_jax.pipeline import FluxPipeline
from pipeline_fixture import IMAGE_SIZE

PROMPTS = ["a red cube above a blue sphere", "two small green cylinders"]
T5_LEN = 24


@pytest.fixture(scope="module")
def pipes(tiny_flux_dir):
    from diffusers import FluxPipeline as TorchFluxPipeline

    ours = FluxPipeline.from_pretrained(tiny_flux_dir, dtype=jnp.float32, max_sequence_length=T5_LEN)
    theirs = TorchFluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    return ours, theirs


def test_encode_prompt_matches_diffusers(pipes):
    ours, theirs = pipes
    txt, txt_ids, pooled = ours.encode_prompt(PROMPTS)
    with torch.no_grad():
        ref_txt, ref_pooled, ref_ids = theirs.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LEN)
    chex.assert_shape(txt, (2, T5_LEN, 32))
    chex.assert_shape(txt_ids, (2, T5_LEN, 3))
    # Bound: 1e-4 relative to the outputs' scale (fp32 on CPU).
    np.testing.assert_allclose(np.asarray(txt), ref_txt.numpy(), atol=1e-4 * max(1, np.abs(ref_txt.numpy()).max()))
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled.numpy(), atol=1e-4 * max(1, np.abs(ref_pooled.numpy()).max()))
    np.testing.assert_array_equal(np.asarray(txt_ids[0]), ref_ids.numpy())


def test_ode_sampler_matches_diffusers_pipeline(pipes):
    ours, theirs = pipes
    steps = 4
    with torch.no_grad():
        ref_txt, ref_pooled, _ = theirs.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LEN)
    h = w = IMAGE_SIZE // ours.vae.cfg.vae_scale_factor
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 16, h, w)).astype(np.float32))
    packed = theirs._pack_latents(noise, 2, 16, h, w)
    with torch.no_grad():
        ref = theirs(
            prompt_embeds=ref_txt, pooled_prompt_embeds=ref_pooled, latents=packed.clone(),
            height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=3.5,
            output_type="latent",
        ).images.numpy()
    embeds = (jnp.asarray(ref_txt.numpy()), jnp.zeros((2, T5_LEN, 3)), jnp.asarray(ref_pooled.numpy()))
    latents = ours.generate_latents(
        prompt_embeds=embeds, latents=jnp.asarray(packed.numpy()), height=IMAGE_SIZE, width=IMAGE_SIZE,
        num_inference_steps=steps, guidance_scale=3.5,
    )
    scale = max(1.0, np.abs(ref).max())
    err = np.abs(np.asarray(latents) - ref).max()
    assert err <= 1e-4 * scale, f"final latents differ by {err} (bound {1e-4 * scale})"
    # Decoding matches diffusers' output_type="np" path too.
    with torch.no_grad():
        ref_img = theirs(
            prompt_embeds=ref_txt, pooled_prompt_embeds=ref_pooled, latents=packed.clone(),
            height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=3.5,
            output_type="np",
        ).images
    img = ours.decode(latents, IMAGE_SIZE, IMAGE_SIZE)
    chex.assert_shape(img, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
    np.testing.assert_allclose(np.asarray(img), ref_img, atol=1e-4)


def test_text_to_image_end_to_end(pipes):
    ours, _ = pipes
    images = ours(PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, key=jax.random.key(0))
    chex.assert_shape(images, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
    chex.assert_tree_all_finite(images)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with pytest.raises(ValueError, match="multiples"):
        ours(PROMPTS, height=18, width=IMAGE_SIZE, key=jax.random.key(0))


@pytest.mark.parametrize("remove", ["vae", "tokenizer_2", "model_index.json", "transformer/config.json"])
def test_missing_component_is_named(tiny_flux_dir, tmp_path, remove):
    broken = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=remove.split("/")[0]) as err:
        FluxPipeline.from_pretrained(broken)
    assert "Expected a diffusers FLUX directory" in str(err.value)
